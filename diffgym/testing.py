"""Gradient checks for DiffGym tasks (and third-party tasks honouring the same contract), the list of
tasks the repository's contract suites check (:func:`tasks_under_test`), and the trainer contract's check
(:func:`check_trainer`, with :func:`counting_simulated_steps`), for trainer plugins of one's own.

The sims run in float32, so finite differences use a step ``eps`` large enough to beat round-off and
compare with ``|fd - ad| <= atol + rtol * |ad|``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState


def tasks_under_test() -> tuple[str, ...]:
    """The tasks the repository's contract suites (``tests/test_contract.py``, ``tests/test_states.py``) check:
    every registered DiffGym task, or, with ``DIFFGYM_TASKS="my_task:Mine/Task-v0,..."`` in the environment,
    those tasks of one's own (``docs/adding_a_task.md``)."""
    import diffgym

    chosen = [task.strip() for task in os.environ.get("DIFFGYM_TASKS", "").split(",") if task.strip()]
    return tuple(chosen) or diffgym.ALL_TASK_IDS


def float_fields(state: SimState) -> list[str]:
    return [n for n, t in zip(state.field_names(), state.tensors()) if t.is_floating_point()]


def rollout_objective(sim: DiffSim, state: SimState, actions: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A scalar touching every differentiable output of ``len(actions)`` chained steps: the summed
    rewards plus fixed random weightings of every observation and of the final state's float fields."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=sim.device)
    for action in actions:
        out = sim.step(state, action)
        w_obs = torch.randn(out.obs.shape, generator=gen).to(sim.device)
        total = total + out.reward.sum() + 0.1 * (w_obs * out.obs).sum()
        state = out.state
    for name in float_fields(state):
        field = getattr(state, name)
        total = total + 0.1 * (torch.randn(field.shape, generator=gen).to(sim.device) * field).sum()
    return total


@dataclass
class GradCheck:
    analytic: torch.Tensor
    numeric: torch.Tensor

    def max_violation(self, rtol: float, atol: float) -> float:
        """Largest ``|fd - ad| - (atol + rtol |ad|)``; <= 0 means the check passes."""
        slack = atol + rtol * self.analytic.abs()
        return float(((self.numeric - self.analytic).abs() - slack).max())

    def assert_close(self, rtol: float, atol: float, what: str = "gradient") -> None:
        excess = self.max_violation(rtol, atol)
        if excess > 0:
            err = (self.numeric - self.analytic).abs()
            i = int(err.argmax())
            raise AssertionError(
                f"{what}: finite differences disagree (worst entry {i}: analytic "
                f"{self.analytic.flatten()[i]:.6g}, numeric {self.numeric.flatten()[i]:.6g}; "
                f"rtol={rtol}, atol={atol})")


def _inputs(state: SimState, actions: torch.Tensor) -> list[torch.Tensor]:
    return [actions] + [getattr(state, n) for n in float_fields(state)]


def _with_inputs(state: SimState, values: Sequence[torch.Tensor]) -> tuple[SimState, torch.Tensor]:
    actions, *fields = values
    return state.replace(**dict(zip(float_fields(state), fields))), actions


def _flat(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def _analytic(objective: Callable, state: SimState, actions: torch.Tensor) -> tuple[torch.Tensor, list]:
    leaves = [t.detach().clone().requires_grad_(True) for t in _inputs(state, actions)]
    s, a = _with_inputs(state, leaves)
    value = objective(s, a)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return _flat(grads), [x.detach() for x in leaves]


def _evaluate(objective: Callable, state: SimState, flat: torch.Tensor, like: list) -> float:
    s, a = _with_inputs(state, _unflat(flat, like))
    with torch.no_grad():
        return float(objective(s, a))


def check_entrywise(sim: DiffSim, state: SimState, actions: torch.Tensor, eps: float = 1e-3) -> GradCheck:
    """Central differences on every entry of the actions ``(H, B, act_dim)`` and the float state fields."""
    objective = lambda s, a: rollout_objective(sim, s, a)  # noqa: E731
    analytic, like = _analytic(objective, state, actions)
    base = _flat(like)
    numeric = torch.empty_like(base)
    for i in range(base.numel()):
        plus, minus = base.clone(), base.clone()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = (_evaluate(objective, state, plus, like) - _evaluate(objective, state, minus, like)) / (2 * eps)
    return GradCheck(analytic.cpu(), numeric.cpu())


def check_directional(sim: DiffSim, state: SimState, actions: torch.Tensor, eps: float = 1e-3,
                      directions: int = 8, seed: int = 0) -> GradCheck:
    """Directional derivatives ``grad . u`` against central differences along random unit ``u``; scales
    to long chains (50+ steps) where entry-wise checks would take thousands of rollouts."""
    objective = lambda s, a: rollout_objective(sim, s, a)  # noqa: E731
    analytic, like = _analytic(objective, state, actions)
    base = _flat(like)
    gen = torch.Generator().manual_seed(seed)
    ad, fd = [], []
    for _ in range(directions):
        u = torch.randn(base.shape, generator=gen).to(base.device)
        u /= u.norm()
        ad.append(float(analytic @ u))
        fd.append((_evaluate(objective, state, base + eps * u, like)
                   - _evaluate(objective, state, base - eps * u, like)) / (2 * eps))
    return GradCheck(torch.tensor(ad), torch.tensor(fd))


# --- the trainer contract ------------------------------------------------------------------------------------


class SimulatedSteps:
    """Every step simulated while :func:`counting_simulated_steps` is active, per simulator: each ``step``,
    ``differentiable_step`` and each step of a ``differentiable_rollout`` ends in a ``DiffSim``'s ``_step``
    or ``rollout``, over all envs of the batch (resets run other kernels and are not steps)."""

    def __init__(self) -> None:
        # (id(sim), batch size) -> [sim, env steps]; the sims are kept alive meanwhile, so no id is reused
        self._sims: dict[tuple[int, int], list] = {}

    def add(self, sim: DiffSim, batch: int, env_steps: int) -> None:
        self._sims.setdefault((id(sim), batch), [sim, 0])[1] += env_steps

    def per_sim(self) -> list[tuple[int, int]]:
        """``(batch size, env steps)`` of each simulator and batch size that stepped, in the order they first
        stepped."""
        return [(batch, steps) for (_, batch), (_, steps) in self._sims.items()]


@contextlib.contextmanager
def counting_simulated_steps() -> Iterator[SimulatedSteps]:
    """Count every step any DiffGym simulator takes inside the block (:class:`SimulatedSteps`), whatever
    made it: a vector env, ``differentiable_step``, a rollout, a planner's own sim."""
    count = SimulatedSteps()
    originals: list[tuple[type, str, Any]] = []

    def counted_step(step: Callable) -> Callable:
        def _step(sim, state, action, physics=None):
            if getattr(sim, "_steps_counted_above", False):
                return step(sim, state, action, physics)
            count.add(sim, state.batch_size, state.batch_size)
            with _steps_counted_above(sim):  # a subclass's _step calling super()._step: one step
                return step(sim, state, action, physics)
        return _step

    def counted_rollout(rollout: Callable) -> Callable:
        def _rollout(sim, state, actions, physics=None):
            if getattr(sim, "_steps_counted_above", False):
                return rollout(sim, state, actions, physics)
            count.add(sim, state.batch_size, actions.shape[0] * state.batch_size)
            with _steps_counted_above(sim):  # a rollout that loops its own _step: counted here, once
                return rollout(sim, state, actions, physics)
        return _rollout

    def uncounted(check_launches: Callable) -> Callable:
        def _check_launches(sim):
            with _steps_counted_above(sim):  # the core's one-env probe of a task's kernels: no env's step
                return check_launches(sim)
        return _check_launches

    def wrap(cls: type) -> None:
        for name, wrapper in (("_step", counted_step), ("rollout", counted_rollout), ("check_launches", uncounted)):
            if name in cls.__dict__:
                originals.append((cls, name, cls.__dict__[name]))
                setattr(cls, name, wrapper(cls.__dict__[name]))

    todo = [DiffSim]
    while todo:  # a task class that overrides _step (Newton's solver step) or rollout is counted too
        cls = todo.pop()
        wrap(cls)
        todo.extend(cls.__subclasses__())
    own_hook = "__init_subclass__" in DiffSim.__dict__
    hook = DiffSim.__dict__.get("__init_subclass__")

    def init_subclass(cls, **kwargs: Any) -> None:  # a task class defined inside the block (a lazy import)
        if hook is not None:
            hook.__func__(cls, **kwargs)
        else:
            super(DiffSim, cls).__init_subclass__(**kwargs)
        wrap(cls)

    DiffSim.__init_subclass__ = classmethod(init_subclass)
    try:
        yield count
    finally:
        if own_hook:
            DiffSim.__init_subclass__ = hook
        else:
            del DiffSim.__init_subclass__
        for cls, name, original in reversed(originals):
            setattr(cls, name, original)


@contextlib.contextmanager
def _steps_counted_above(sim: DiffSim) -> Iterator[None]:
    sim._steps_counted_above = True
    try:
        yield
    finally:
        sim._steps_counted_above = False


class TrainerContractError(AssertionError):
    """A trainer broke the protocol :func:`check_trainer` checks; the message is one line naming the rule."""


def check_trainer(algo: str, run_dir: str | Path, env_id: str = "DiffGym/PointMass1D-v0",
                  changes: Mapping[str, Any] | None = None, resumes: bool = True,
                  budgets: tuple[int, int] = (24, 200)) -> None:
    """Train the trainer called ``algo`` twice on a tiny budget into ``run_dir`` (which must not exist yet) and
    check what every comparison of DiffGym relies on (``docs/protocol.md``, ``docs/plugins.md``):

    * ``train`` returns the config's run directory;
    * it evaluates at exactly the schedule's points (a geometric schedule, 4 training envs, 3 evaluation
      episodes: every point a whole vector step);
    * every step it simulates for training, in any form, is a logged env step, and it stops at the budget:
      the steps of every simulator other than the evaluations' (3 envs each, one per evaluation) equal the
      logged env steps;
    * its ``cli_flags`` are none of ``diffgym train``'s and ``diffgym ablate``'s own flags, and each sets a key
      its defaults list (or one ``upgrade_config`` moves);
    * the run directory holds a policy ``diffgym.load_policy`` reads (weights-only) for this task at the first
      budget, and ``evaluate_config`` on it gives the evaluation row logged there (the run's evaluation
      protocol, the parameters evaluated);
    * run again with the larger budget, a trainer that ``resumes`` continues from the first run's budget,
      simulating only the steps past it and keeping the first run's evaluations; one that does not starts
      afresh (its earlier checkpoints set aside by ``Run``) and evaluates the whole schedule again.

    ``changes``: dotted config overrides that make a run this small possible (PPO's ``algo_params.n_steps``,
    ``algo_params.batch_size``). Raises :class:`TrainerContractError` (an ``AssertionError``) naming the rule.
    Runs in this process, on the CPU; a few seconds for the bundled trainers."""
    from diffgym.experiments.training_runs import call_train
    from diffgym.plugins import load_trainer, resolve_config
    from diffgym.policy import load_policy
    from diffgym.training.run import read_metrics

    num_envs, eval_episodes = 4, 3  # different, so evaluation envs are told apart from training envs by size
    run_dir = Path(run_dir)
    if run_dir.exists():
        raise ValueError(f"check_trainer: run_dir {run_dir} exists; give a fresh path")
    trainer = load_trainer(algo)  # also checks the Trainer protocol
    first_budget, budget = budgets
    if first_budget % num_envs or budget % num_envs or not 0 < first_budget < budget:
        raise ValueError(f"check_trainer: budgets must be multiples of {num_envs}, the first smaller, got {budgets}")
    base = {"eval_schedule": "geometric", "eval_first_env_steps": 8, "eval_growth": 2.0, "eval_every_env_steps": 64,
            "num_envs": num_envs, "eval_episodes": eval_episodes, "device": "cpu", "run_dir": str(run_dir),
            **dict(changes or {})}

    def fail(rule: str) -> TrainerContractError:
        return TrainerContractError(f"trainer {algo!r}: {rule}")

    configs = {total: resolve_config(algo, env_id, {**base, "total_env_steps": total}) for total in budgets}
    first_points, points = (configs[total].evaluation_points() for total in budgets)

    def train(total: int) -> tuple[list[dict], list[tuple[int, int]]]:
        with counting_simulated_steps() as count:
            returned = call_train(trainer, configs[total], progress=False)
        if returned is None or Path(returned).resolve() != run_dir.resolve():
            raise fail(f"train returned {returned!r}, not the config's run_dir {str(run_dir)!r}")
        return read_metrics(run_dir), count.per_sim()

    def check(rows: list[dict], sims: list[tuple[int, int]], expected_points: list[int], start: int,
              total: int, which: str) -> None:
        logged = [row["env_steps"] for row in rows]
        if any(b < a for a, b in zip(logged, logged[1:])):
            raise fail(f"{which}: env_steps in metrics.jsonl go backwards: {logged}")
        evaluations = [row["env_steps"] for row in rows if "eval_success_rate" in row]
        if evaluations != expected_points:
            raise fail(f"{which}: evaluations at env steps {evaluations}, the schedule's points are {expected_points} "
                       "(EvaluationCadence tells when)")
        if max(logged, default=0) != total:
            raise fail(f"{which}: the last logged env_steps is {max(logged, default=0)}, the budget {total}")
        evaluation_sims = [steps for batch, steps in sims if batch == eval_episodes]
        evaluated = len([p for p in expected_points if p > start or p == start == 0])
        if len(evaluation_sims) != evaluated or any(steps % eval_episodes for steps in evaluation_sims):
            raise fail(f"{which}: {len(evaluation_sims)} evaluation env(s) of {eval_episodes} episodes stepped for "
                       f"{evaluated} evaluations (evaluate with evaluate_config or evaluate_and_checkpoint)")
        simulated = sum(steps for batch, steps in sims if batch != eval_episodes)
        if simulated != total - start:
            raise fail(f"{which}: simulated {simulated:,} training env steps from env step {start:,}, logged "
                       f"{total - start:,} (every simulated step is an env step: docs/protocol.md)")

    _check_cli_flags(algo, trainer, env_id, fail)
    rows, sims = train(first_budget)
    check(rows, sims, first_points, 0, first_budget, "first run")
    try:  # a weights-only checkpoint with the shared keys for this task, holding the parameters evaluated last
        policy = load_policy(run_dir, step=first_budget)
    except (FileNotFoundError, ValueError) as error:
        raise fail(f"no policy diffgym.load_policy can read at env step {first_budget} in the run directory "
                   f"({' '.join(str(error).split())})")
    _check_evaluation_reproduces(policy, [row for row in rows if "eval_return" in row][-1], fail)
    rows, sims = train(budget)
    if not resumes:
        check(rows, sims, points, 0, budget, "second run (no resume)")
        return
    evaluations = [row["env_steps"] for row in rows if "eval_success_rate" in row]
    if evaluations == points:
        raise fail("resumed run: started afresh instead of resuming from its checkpoint (load "
                   "run.load_latest_checkpoint() and call run.resume_from(env_steps)), or pass resumes=False")
    if evaluations[:1] != [0]:
        raise fail(f"resumed run: the first run's evaluation rows are gone (evaluations at {evaluations}): call "
                   "run.resume_from(env_steps) before logging anything")
    check(rows, sims, first_points + [p for p in points if p > first_budget], first_budget, budget, "resumed run")


def _check_cli_flags(algo: str, trainer: Any, env_id: str, fail: Callable[[str], TrainerContractError]) -> None:
    """Each of the trainer's ``cli_flags`` must reach the trainer: none is a flag ``train`` or ``ablate`` has
    already, and each sets a key the defaults list (or one ``upgrade_config`` moves: APG's flat keys)."""
    from diffgym.commands import load as load_command
    from diffgym.commands.options import ArgumentParser, add_trainer_flags
    from diffgym.plugins import flag_parameter, trainer_flags

    for command in ("train", "ablate"):
        parser = ArgumentParser(prog=f"diffgym {command}")
        load_command(command).add_arguments(parser)
        clashes = add_trainer_flags(parser, command, algo, parser.get_default("plugin_flags"))
        if clashes:
            raise fail(f"cli_flags {clashes} are flags diffgym {command} already has; rename them")
    if getattr(trainer, "upgrade_config", None) is None:
        defaults = dict(trainer.default_config(env_id) or {}).get("algo_params", {}) or {}
        unset = [f"--{flag}" for flag in trainer_flags(trainer) if flag_parameter(flag) not in defaults]
        if unset:
            raise fail(f"cli_flags {unset} set algo_params keys its default_config does not list, so using them "
                       f"is refused; add {[flag_parameter(f) for f in unset]} to the defaults")


def _check_evaluation_reproduces(policy: Any, row: dict, fail: Callable[[str], TrainerContractError]) -> None:
    """The run's last evaluation row is what ``evaluate_config`` gives for the checkpoint saved with it: the
    evaluation ran the run's task arguments, wrappers and evaluation seeds, and the checkpoint holds the
    parameters it evaluated (``diffgym eval`` reproduces the row)."""
    from diffgym.policy_commands import evaluate

    again = evaluate(policy, policy.config.eval_episodes, policy.config.seed)
    if (abs(again["eval_return"] - row["eval_return"]) > 1e-4 * max(1.0, abs(row["eval_return"]))
            or again["eval_success_rate"] != row["eval_success_rate"]):
        raise fail(f"the evaluation at env step {row['env_steps']} logged return {row['eval_return']:.6g}, success "
                   f"{row['eval_success_rate']:.3g}; evaluate_config on the checkpoint saved with it gives "
                   f"{again['eval_return']:.6g}, {again['eval_success_rate']:.3g} (evaluate with evaluate_config or "
                   "evaluate_and_checkpoint, and checkpoint the parameters evaluated)")
