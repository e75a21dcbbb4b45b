"""Bad ``set_physics`` masks and non-numeric physics values are one-line errors naming what was expected
and the API the caller used; a NumPy, list or tensor bool mask works for ``set_physics`` as for ``reset``."""

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def venv():
    return gym.make_vec("DiffGym/PointMass1D-v0", num_envs=4)


@pytest.mark.parametrize("mask", [np.array([True, False, False, True]), [True, False, False, True],
                                  torch.tensor([True, False, False, True])])
def test_set_physics_takes_a_numpy_list_or_tensor_bool_mask(venv, mask):
    venv.reset(seed=0, options={"physics": {"mass": 1.0}})
    venv.set_physics({"mass": 2.0}, mask=mask)
    assert venv.get_physics()["mass"].tolist() == [2.0, 1.0, 1.0, 2.0]
    venv.reset(options={"reset_mask": mask, "physics": {"mass": 3.0}})  # the same forms reset takes
    assert venv.get_physics()["mass"].tolist() == [3.0, 1.0, 1.0, 3.0]


@pytest.mark.parametrize("mask, got", [
    (np.array([True, False]), "ndarray of dtype bool and shape (2,)"),
    (torch.tensor([1, 0, 0, 1]), "torch.int64 of shape (4,) on cpu"),
    ([1, 0, 0, 1], "list of dtype int64 and shape (4,)"),
    ("yes", "str"),
    ([[True], [False, True], [True], [True]], "list"),  # ragged: NumPy cannot make an array of it
])
def test_set_physics_refuses_a_bad_mask_in_one_line(venv, mask, got):
    before = venv.get_physics()["mass"].clone()
    with pytest.raises(ValueError) as error:
        venv.set_physics({"mass": 2.0}, mask=mask)
    assert str(error.value) == f"set_physics's mask must be a bool array, list or tensor of shape (4,), got {got}"
    assert torch.equal(venv.get_physics()["mass"], before)


@pytest.mark.parametrize("value", ["heavy", None])
def test_a_non_numeric_physics_value_names_the_parameter_and_the_api(venv, value):
    with pytest.raises(TypeError) as error:
        venv.reset(options={"physics": {"mass": value}})
    assert str(error.value) == f"options['physics']['mass'] must be a number or (4,) numbers, got {value!r}"
    with pytest.raises(TypeError) as error:
        venv.set_physics({"mass": value})
    assert str(error.value) == f"set_physics's physics['mass'] must be a number or (4,) numbers, got {value!r}"


def test_an_unknown_name_in_set_physics_does_not_mention_options(venv):
    with pytest.raises(ValueError, match=r"^set_physics's physics names 'mas', which is not a physical parameter"):
        venv.set_physics({"mas": 1.0})


def test_the_api_doc_reads_a_made_envs_physics_through_unwrapped():
    env = gym.make("DiffGym/PointMass1D-v0")
    env.reset(options={"physics": {"mass": 2.0}})
    assert not hasattr(env, "get_physics")  # gymnasium's wrappers do not forward it
    assert env.unwrapped.get_physics()["mass"].tolist() == [2.0]
    doc = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    assert "`env.unwrapped.get_physics()`" in doc and "`env.get_physics()`" not in doc
