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
