"""System identification through contact: docs/api.md's TPush example recovers the T's mass and the
pusher-block friction from one recorded 100-step trajectory of the T's pose."""

from __future__ import annotations

import re
import time
from pathlib import Path

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def example(section: str) -> str:
    """The first Python block under the ``## section`` heading of docs/api.md."""
    text = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", API_MD.read_text(), flags=re.S | re.M)
    assert text, f"docs/api.md has no section '## {section}'"
    return re.search(r"```python\n(.*?)```", text.group(1), flags=re.S).group(1)


def test_tpush_mass_and_friction_are_recovered_within_5_percent_from_the_defaults():
    namespace = {}
    started = time.perf_counter()
    exec(compile(example("System identification through contact"), "docs/api.md", "exec"), namespace)
    elapsed = time.perf_counter() - started
    identified, truth = namespace["identified"], namespace["true_physics"]
    # the fit starts at the task's defaults, which miss the truth by 25 % (mass) and 30 % (friction)
    defaults = namespace["env"].sim.default_physics(1)
    assert (float(defaults["block_mass"]), float(defaults["contact_friction"])) == (1.0, 0.30000001192092896)
    assert truth == {"block_mass": 0.75, "contact_friction": 0.39}
    for name in truth:
        # 5 %: the bound the issue sets; 1 %: the precision docs/api.md states for this deterministic example
        assert abs(identified[name] - truth[name]) < 0.05 * truth[name], (name, identified[name])
        assert abs(identified[name] - truth[name]) < 0.01 * truth[name], (name, identified[name])
    print(f"sysid example: {identified} in {elapsed:.1f} s")
    assert elapsed < 60, f"the example took {elapsed:.1f} s"
