"""docs/tasks.md and the env docstrings say what the code does: one section per registered task, its
horizon, its reward threshold and its arguments (with the registration's overrides) as in the code."""

import ast
import inspect
import pathlib
import re

import gymnasium as gym
import pytest
from gymnasium.envs.registration import load_env_creator

import diffgym

TASKS_MD = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()


def section(env_id: str) -> str:
    match = re.search(rf"^## {re.escape(env_id)}\n(.*?)(?=^## |\Z)", TASKS_MD, flags=re.S | re.M)
    assert match, f"docs/tasks.md has no section '## {env_id}'"
    return match.group(1)


def assignments(text: str) -> dict[str, object]:
    """``name=value`` pairs written as Python literals (``max_speed=0.5``, ``reward_type="sparse"``)."""
    pairs = re.findall(r"\b([a-z_]+)=(\"[^\"]*\"|-?[0-9.]+(?:e-?[0-9]+)?|True|False|None)", text)
    return {name: ast.literal_eval(value) for name, value in pairs}


def constructor_defaults(env_id: str) -> dict[str, object]:
    sim_class = load_env_creator(gym.spec(env_id).entry_point).sim_class
    parameters = inspect.signature(sim_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.name not in ("device", "max_episode_steps")}


@pytest.mark.parametrize("env_id", diffgym.ALL_TASK_IDS)
def test_tasks_md_matches_the_registration(env_id):
    spec, text = gym.spec(env_id), section(env_id)
    assert f"after {spec.max_episode_steps} steps" in text, f"{env_id}: horizon {spec.max_episode_steps} not stated"
    threshold = re.search(r"^\| `reward_threshold` \| (-?[0-9.]+)", text, flags=re.M)
    assert threshold and float(threshold.group(1)) == spec.reward_threshold
    row = re.search(r"^\| Arguments \| (.*)$", text, flags=re.M)
    if row:  # the task's arguments as this id registers them
        expected = {**constructor_defaults(env_id),
                    **{k: v for k, v in spec.kwargs.items() if k != "max_episode_steps"}}
        assert assignments(row.group(1)) == expected


@pytest.mark.parametrize("env_cls", sorted({load_env_creator(gym.spec(e).entry_point) for e in diffgym.ALL_TASK_IDS},
                                           key=lambda c: c.__name__))
def test_env_docstring_arguments_are_the_defaults(env_cls):
    doc = inspect.getdoc(env_cls) or ""
    match = re.search(r"## Arguments\n(.*?)(?=\n## |\Z)", doc, flags=re.S)
    assert match, f"{env_cls.__name__}'s docstring has no '## Arguments' section"
    documented = {k: v for k, v in assignments(match.group(1)).items() if k not in ("device", "render_mode",
                                                                                     "num_envs")}
    first_id = next(e for e in diffgym.ALL_TASK_IDS if load_env_creator(gym.spec(e).entry_point) is env_cls)
    assert documented == constructor_defaults(first_id)
