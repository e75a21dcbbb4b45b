"""The runnable examples in docs/ run."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str) -> list[str]:
    text = (DOCS / name).read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "import" in b and "..." not in b]


@pytest.mark.parametrize("name", ["api.md"])
def test_runnable_examples(name, capsys):
    blocks = [b for b in python_blocks(name) if "N)" not in b]
    assert blocks, f"no runnable example in {name}"
    for block in blocks:
        exec(compile(block, f"docs/{name}", "exec"), {})
    assert "mean return" in capsys.readouterr().out


def test_fine_tuning_example_runs_on_a_trained_run(tmp_path):
    """api.md's "Fine-tuning a trained policy" (not run above: it needs a run of the reader's), on a short
    run of its own: the tuned policy is written where diffgym eval reads it, with its env steps."""
    import diffgym
    from diffgym.plugins import load_trainer, resolve_config

    text = (DOCS / "api.md").read_text()
    block = text.split("## Fine-tuning a trained policy")[1].split("```python\n")[1].split("```")[0]
    run = load_trainer("apg").train(resolve_config("apg", "DiffGym/PointMass1D-v0", {
        "total_env_steps": 512, "eval_every_env_steps": 512, "eval_episodes": 2, "run_dir": str(tmp_path / "pm")}),
        progress=False)
    block = block.replace('"runs/pm"', repr(str(run))).replace('"runs/pm_tuned.safetensors"',
                                                               repr(str(tmp_path / "tuned.safetensors")))
    exec(compile(block, "docs/api.md", "exec"), {})
    tuned = diffgym.load_policy(tmp_path / "tuned.safetensors")
    assert tuned.env_steps == diffgym.load_policy(run).env_steps + 50 * 16 * 32
