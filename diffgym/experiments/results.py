"""``diffgym results``: every learning-curve table and plot of ``docs/results.md`` from one manifest.

A results manifest (YAML; the project's is ``docs/results/experiments.yml``) names experiments. Each is
a set of labelled groups of training runs on one task (a trainer, its budget, overrides and evaluation
interval, over the experiment's seeds) and the report drawn from them: curves against env
steps and gradient steps, the threshold table with per-seed costs and the baseline/contender ratios
(:func:`diffgym.experiments.report.write_report`). ``run_experiments`` trains what is missing through a
sweep runner (local processes or Ray; finished runs are reused, interrupted ones resume), writes each
report into the manifest's folder and, where a Markdown document carries the experiment's markers,
replaces the table between them::

    <!-- results: reuse_PointMass1D -->
    ...the threshold table, rewritten by every `diffgym results` run...
    <!-- /results: reuse_PointMass1D -->

Run directories live under ``runs_dir/<experiment>/<group>__s<seed>``; one made with another config than
the manifest now asks for is refused (naming the fields) rather than silently reported under a new label.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from diffgym.experiments.report import SUCCESS_THRESHOLD, write_report
from diffgym.experiments.sweep import LocalRunner, Runner, save_sweep
from diffgym.experiments.training_runs import reuse_plan
from diffgym.plugins import resolve_config
from diffgym.training.run import replace_atomically
from diffgym.training.spec import TrainConfig

EXPERIMENT_KEYS = {"title", "env", "seeds", "eval_every", "groups", "report_dir", "baseline", "contender",
                   "log_x", "threshold", "set"}
GROUP_KEYS = {"label", "algo", "env_steps", "set", "seeds", "eval_every"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs of one trainer setting: ``algo`` with ``overrides`` (dotted config keys) for ``env_steps``,
    evaluated every ``eval_every`` env steps (the experiment's unless the group names its own)."""

    label: str
    algo: str
    env_steps: int
    overrides: Mapping[str, Any]
    seeds: tuple[int, ...]
    eval_every: int

    @property
    def slug(self) -> str:
        """The label as a run-directory name."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label).strip("_")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One report: ``groups`` on task ``env``."""

    name: str
    title: str
    env: str
    groups: tuple[Group, ...]
    report_dir: Path
    baseline: str | None = None
    contender: str | None = None
    log_x: bool = False
    threshold: float = SUCCESS_THRESHOLD

    def run_dir(self, runs_dir: str | Path, group: Group, seed: int) -> Path:
        return Path(runs_dir) / self.name / f"{group.slug}__s{seed}"

    def configs(self, runs_dir: str | Path) -> list[TrainConfig]:
        """Every run as a config: each group's trainer defaults for the task, its overrides, the seed, its
        budget and its evaluation interval. A setting the trainer refuses is a one-line ``ValueError`` naming
        the experiment and the group."""
        configs = []
        for item in self.groups:
            try:
                configs += [resolve_config(item.algo, self.env, {
                    **item.overrides, "seed": seed, "total_env_steps": item.env_steps,
                    "eval_every_env_steps": item.eval_every, "run_dir": str(self.run_dir(runs_dir, item, seed))})
                    for seed in item.seeds]
            except (KeyError, TypeError, ValueError) as error:
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                raise ValueError(f"experiment {self.name!r}, group {item.label!r}: {message}") from None
        return configs

    def labels(self, runs_dir: str | Path) -> dict[Path, str]:
        """Run directory -> its group's label."""
        return {self.run_dir(runs_dir, item, seed): item.label for item in self.groups for seed in item.seeds}


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _positive_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise _fail(where, f"{key} must be a positive whole number, got {value!r}")
    return int(value)


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return tuple(range(value))  # a count: seeds 0..S-1, as compare and ablate take them
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        return tuple(value)
    raise _fail(where, f"seeds must be a positive count or a list of distinct seeds >= 0, got {value!r}")


_SET_BY_THE_MANIFEST = {"algo": "algo", "env_id": "env", "seed": "seeds", "total_env_steps": "env_steps",
                        "eval_every_env_steps": "eval_every", "run_dir": "the runs directory"}
"""Config fields a group's own keys set, which ``set`` would silently lose to them."""


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(where, f"set must map dotted config keys to values, e.g. {{algo_params.reuse.epochs: 4}}, "
                           f"got {value!r}")
    taken = sorted(set(value) & set(_SET_BY_THE_MANIFEST))
    if taken:
        raise _fail(where, f"set names {taken[0]!r}, which the manifest sets with {_SET_BY_THE_MANIFEST[taken[0]]!r}")
    return dict(value)


def parse_experiment(name: str, entry: Any, folder: Path) -> Experiment:
    """One manifest entry, with a one-line ``ValueError`` naming the experiment and the key at fault."""
    where = f"experiment {name!r}"
    if not _NAME.match(name):
        raise _fail(where, "names are letters, digits, '_', '-' and '.', starting with a letter or digit")
    if not isinstance(entry, dict):
        raise _fail(where, f"expected a mapping of {sorted(EXPERIMENT_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - EXPERIMENT_KEYS)
    missing = sorted({"env", "seeds", "eval_every", "groups"} - set(entry))
    if unknown or missing:
        raise _fail(where, f"unknown key {unknown[0]!r} (expected {sorted(EXPERIMENT_KEYS)})" if unknown
                    else f"missing key {missing[0]!r}")
    seeds = _seeds(entry["seeds"], where)
    eval_every = _positive_int(entry["eval_every"], where, "eval_every")
    shared = _overrides(entry.get("set"), where)
    if not isinstance(entry["groups"], list) or not entry["groups"]:
        raise _fail(where, "groups must be a non-empty list of {label, algo, env_steps[, set, seeds]}")
    groups = []
    for index, item in enumerate(entry["groups"]):
        at = f"{where}, group {index + 1}"
        if not isinstance(item, dict):
            raise _fail(at, f"expected a mapping of {sorted(GROUP_KEYS)}, got {item!r}")
        unknown = sorted(set(item) - GROUP_KEYS)
        missing = sorted({"label", "algo", "env_steps"} - set(item))
        if unknown or missing:
            raise _fail(at, f"unknown key {unknown[0]!r} (expected {sorted(GROUP_KEYS)})" if unknown
                        else f"missing key {missing[0]!r}")
        label = item["label"]
        if (not isinstance(label, str) or not re.sub(r"[^A-Za-z0-9]", "", label) or "|" in label
                or "\n" in label):
            raise _fail(at, f"label must be text with a letter or digit, without '|' or line breaks (it names a "
                            f"table row and a run folder), got {label!r}")
        groups.append(Group(item["label"], str(item["algo"]), _positive_int(item["env_steps"], at, "env_steps"),
                            {**shared, **_overrides(item.get("set"), at)},
                            _seeds(item["seeds"], at) if "seeds" in item else seeds,
                            _positive_int(item["eval_every"], at, "eval_every") if "eval_every" in item
                            else eval_every))
    labels = [g.label for g in groups]
    slugs = [g.slug for g in groups]
    if len(set(labels)) != len(labels) or len(set(slugs)) != len(slugs):
        raise _fail(where, f"group labels must differ (also as directory names), got {labels}")
    for role in ("baseline", "contender"):
        if entry.get(role) is not None and entry[role] not in labels:
            raise _fail(where, f"{role} {entry[role]!r} is not one of the group labels {labels}")
    threshold = entry.get("threshold", SUCCESS_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise _fail(where, f"threshold must be a success rate in (0, 1], got {threshold!r}")
    report_dir = entry.get("report_dir", name)
    if (not isinstance(report_dir, str) or Path(report_dir).is_absolute() or ".." in Path(report_dir).parts
            or Path(report_dir) == Path(".")):
        raise _fail(where, f"report_dir must be a folder inside the manifest's folder, got {report_dir!r}")
    if not isinstance(entry.get("log_x", False), bool):
        raise _fail(where, f"log_x must be true or false, got {entry['log_x']!r}")
    return Experiment(name, str(entry.get("title") or name), str(entry["env"]), tuple(groups), folder / report_dir,
                      entry.get("baseline"), entry.get("contender"), bool(entry.get("log_x", False)), float(threshold))


def load_manifest(path: str | Path) -> dict[str, Experiment]:
    """The manifest's experiments by name, in file order; reports go to paths relative to its folder."""
    path = Path(path)
    try:
        with open(path) as stream:  # a stream, so YAML's errors name the file
            data = yaml.load(stream, Loader=_UniqueKeyLoader)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the manifest ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), dict) or not data["experiments"]:
        raise ValueError(f"{path}: expected a top-level 'experiments:' mapping of names to experiments")
    unknown = sorted(set(data) - {"experiments", "settings"})
    if unknown:  # `settings:` holds YAML anchors the experiments refer to (e.g. a trainer's earlier default)
        raise ValueError(f"{path}: unknown top-level key {unknown[0]!r} (expected 'experiments' and 'settings')")
    experiments = {str(name): parse_experiment(str(name), entry, path.parent)
                   for name, entry in data["experiments"].items()}
    seen: dict[Path, str] = {}
    for experiment in experiments.values():
        other = seen.setdefault(experiment.report_dir, experiment.name)
        if other != experiment.name:
            raise ValueError(f"{path}: experiments {other!r} and {experiment.name!r} share report_dir "
                             f"{experiment.report_dir}; each report needs its own folder")
    return experiments


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (which would drop all but the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # the keys written in this mapping (a merge key, `<<: *anchor`, brings others in: those may be overridden)
        keys = [key.value for key, _ in node.value
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge"]
        repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if repeated is not None:
            raise yaml.constructor.ConstructorError(None, None, f"key {repeated!r} appears twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def select(experiments: Mapping[str, Experiment], names: Sequence[str]) -> list[Experiment]:
    """The named experiments (all when ``names`` is empty), with a one-line error for an unknown name."""
    for name in names:
        if name not in experiments:
            raise ValueError(f"no experiment {name!r} in the manifest (it has {', '.join(experiments)})")
    return [experiments[n] for n in dict.fromkeys(names)] if names else list(experiments.values())


def config_changes(configs: Sequence[TrainConfig]) -> list[tuple[str, list[str]]]:
    """``(run directory, [fields])`` for each existing run whose saved config differs from the one asked
    for in anything but its budget and evaluation schedule (which ``reuse_plan`` judges).

    A field the saved config lacks is a setting added after that run was made, with the default that keeps
    the earlier behaviour: it differs only where the config asked for now sets it to something else than the
    trainer's default for the task."""
    return _config_changes(_saved_configs(configs))


def _saved_configs(configs: Sequence[TrainConfig]) -> list[tuple[TrainConfig, TrainConfig]]:
    """``(asked for, saved)`` for each config whose run directory already holds a ``config.yaml``."""
    return [(config, TrainConfig.load(Path(config.run_dir) / "config.yaml")) for config in configs
            if (Path(config.run_dir) / "config.yaml").exists()]


def _config_changes(pairs: Sequence[tuple[TrainConfig, TrainConfig]]) -> list[tuple[str, list[str]]]:
    ignored = {"run_dir", "total_env_steps", "eval_every_env_steps", "eval_schedule", "eval_first_env_steps",
               "eval_growth", "eval_episodes"}
    changed, defaults = [], {}
    for config, saved in pairs:
        key = (config.algo, config.env_id)
        if key not in defaults:
            defaults[key] = resolve_config(config.algo, config.env_id).to_dict()
        fields = sorted(_differences(saved.to_dict(), config.to_dict(), defaults[key], "", ignored))
        if fields:
            changed.append((str(config.run_dir), fields))
    return changed


_ABSENT = object()


def _differences(saved: Any, wanted: Any, default: Any, prefix: str, ignored: set[str]) -> list[str]:
    """Dotted keys whose values differ, judging a key ``saved`` lacks against ``default`` (see
    :func:`config_changes`)."""
    if saved is _ABSENT:
        saved = default
    if isinstance(saved, dict) and isinstance(wanted, dict):
        default = default if isinstance(default, dict) else {}
        out = []
        for key in sorted(set(saved) | set(wanted)):
            dotted = f"{prefix}{key}"
            if dotted not in ignored:
                out += _differences(saved.get(key, _ABSENT), wanted.get(key), default.get(key), f"{dotted}.", ignored)
        return out
    return [] if saved == wanted else [prefix.rstrip(".")]


def check_runs(experiment: Experiment, configs: Sequence[TrainConfig], extend: bool = False) -> str:
    """What the experiment's existing run directories reuse (one line, maybe empty); a one-line
    ``ValueError`` where one was made with another setting, budget or schedule (unless ``extend``, which
    allows only the last two)."""
    pairs = _saved_configs(configs)  # each saved config read once for both checks
    shortened = [(config, saved) for config, saved in pairs if saved.total_env_steps > config.total_env_steps]
    if shortened:  # its curve and final values would be the longer run's, under the shorter budget's label
        config, saved = shortened[0]
        raise ValueError(f"experiment {experiment.name!r}: {config.run_dir} was trained for "
                         f"{saved.total_env_steps:,} env steps, more than the {config.total_env_steps:,} asked for "
                         "now; move it away or pass another --runs-dir")
    changed = _config_changes(pairs)
    if changed:
        run_dir, fields = changed[0]
        more = f" (and {len(changed) - 1} more runs)" if len(changed) > 1 else ""
        raise ValueError(f"experiment {experiment.name!r}: {run_dir} was trained with another setting "
                         f"({', '.join(fields[:4])}{', ...' if len(fields) > 4 else ''}){more}; move it away "
                         "or pass another --runs-dir")
    return reuse_plan(configs, extend, out_flag="--runs-dir")


def check_markers(document: str | Path, names: Sequence[str]) -> None:
    """A one-line ``ValueError`` unless ``document`` holds each experiment's opening marker followed by its
    closing one (checked before any training, so hours of runs do not end in a table with nowhere to go)."""
    path = Path(document)
    if not path.is_file():
        raise ValueError(f"--document {path}: not a file")
    text = path.read_text()
    for name in names:
        opening, closing = f"<!-- results: {name} -->", f"<!-- /results: {name} -->"
        start = text.find(opening)
        if start < 0 or text.find(closing, start) < 0:
            missing = opening if start < 0 else f"{closing} after {opening}"
            raise ValueError(f"{path} has no {missing}: the table of experiment {name!r} goes between the two "
                             "markers, each on a line of its own")


def replace_block(document: str, name: str, block: str) -> tuple[str, bool]:
    """``document`` with the text between ``name``'s markers replaced by ``block``; whether it had them."""
    start, end = re.escape(f"<!-- results: {name} -->"), re.escape(f"<!-- /results: {name} -->")
    pattern = re.compile(rf"({start}(\r?\n))(?:.*?\r?\n)?({end})", re.DOTALL)
    match = pattern.search(document)
    if match is None:
        return document, False
    newline = match.group(2)  # the file's own line ending
    body = newline.join(block.strip("\n").split("\n")) + newline
    return document[:match.start()] + match.group(1) + body + match.group(3) + document[match.end():], True


def run_experiment(experiment: Experiment, runs_dir: str | Path, runner: Runner | None = None,
                   extend: bool = False) -> tuple[Path, str]:
    """Train the experiment's missing runs, write its report; the report's path and its table."""
    configs = experiment.configs(runs_dir)
    reused = check_runs(experiment, configs, extend)
    if reused:
        print(f"results {experiment.name}: {reused}", flush=True)
    save_sweep(configs, Path(runs_dir) / experiment.name / "sweep.jsonl")
    run_dirs = (runner or LocalRunner()).run(configs)
    labels = experiment.labels(runs_dir)
    report = write_report(run_dirs, experiment.report_dir, experiment.title, key=lambda run: labels[Path(run.path)],
                          threshold=experiment.threshold, baseline=experiment.baseline,
                          contender=experiment.contender, log_x=experiment.log_x)
    # the report is "# title", the table, then the plots' image links
    table = report.read_text().split("\n", 1)[1].split("\n![")[0].strip("\n")
    return report, table


def run_experiments(experiments: Sequence[Experiment], runs_dir: str | Path, runner: Runner | None = None,
                    document: str | Path | None = None, extend: bool = False) -> dict[str, Path]:
    """:func:`run_experiment` for each, in order, each followed by its table between its markers in
    ``document`` (if given), so an experiment that fails later leaves the finished ones written. Returns
    each experiment's report path. The document's markers are checked before anything trains."""
    if document is not None:
        check_markers(document, [e.name for e in experiments])
    reports = {}
    for experiment in experiments:
        reports[experiment.name], table = run_experiment(experiment, runs_dir, runner, extend)
        if document is None:
            continue
        path = Path(document)
        with open(path, newline="") as file:  # as it is, line endings included
            text, found = replace_block(file.read(), experiment.name, table)
        if not found:  # the markers were there when the command started
            raise ValueError(f"{path}: the markers of experiment {experiment.name!r} went away during the run; its "
                             f"table is in {reports[experiment.name]}")
        # written beside and renamed over it: an interrupted write leaves the document whole
        replace_atomically(path, lambda tmp: open(tmp, "w", newline="").write(text))
        print(f"results {experiment.name}: table written in {path}", flush=True)
    return reports
