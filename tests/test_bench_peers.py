"""`make bench-peers` and `make gpu-check` (benchmarks/bench_peers.py, benchmarks/gpu_check.py): their
refusals are one line, the benchmark stops when a twin does not follow DiffGym, and the whole GPU check
path runs on the CPU (slow). No speed is asserted."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_gpu_check_without_gpu_is_one_line():
    result = run("benchmarks/gpu_check.py", "--out", "runs/gpu-check/never-written.md")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no usable GPU:"), result.stderr
    assert not (REPO / "runs/gpu-check/never-written.md").exists()


def test_bench_peers_without_peers_is_one_line():
    from importlib import metadata

    try:
        for package in ("panda-gym", "gym-pusht", "jax"):
            metadata.version(package)
        pytest.skip("every peer is installed here")
    except metadata.PackageNotFoundError:
        pass
    result = run("benchmarks/bench_peers.py", "--quick")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not installed" in lines[0] and "make bench-peers" in lines[0], result.stderr
    assert result.stdout == ""


@pytest.fixture
def bench_peers(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports its sibling `twins`
    import bench_peers

    return bench_peers


def test_twin_that_differs_from_diffgym_stops_the_benchmark(bench_peers, monkeypatch):
    import twins

    args = bench_peers.parse_args(["--sizes", "8", "--steps", "4", "--tasks", "DiffGym/PointMass1D-v0"])
    fns = bench_peers.batched_case("DiffGym/PointMass1D-v0", 8, args, None)  # the faithful twin passes
    assert set(fns) == {"diffgym fwd", "fused fwd", "torch fwd", "diffgym fwd+bwd", "fused fwd+bwd", "torch fwd+bwd"}
    wrong = classmethod(lambda cls, sim: cls(float(sim.params.dt), 1.1 * float(sim.params.mass),
                                             float(sim.params.action_cost)))
    monkeypatch.setattr(twins.PointMass1DConstants, "from_sim", wrong)
    with pytest.raises(bench_peers.TwinMismatch, match="PointMass1D-v0 torch twin rewards"):
        bench_peers.batched_case("DiffGym/PointMass1D-v0", 8, args, None)


def test_bench_peers_rejects_unknown_task(bench_peers):
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--tasks", "DiffGym/TPush-v1"])


@pytest.mark.slow
def test_gpu_check_path_on_cpu(tmp_path):
    """Every step `make gpu-check` runs works with --device cpu (peers that are missing read n/a)."""
    out = tmp_path / "report.md"
    result = run("benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--allow-missing", "--out", str(out),
                 timeout=600)
    assert result.returncode == 0, result.stderr
    report = out.read_text()
    for heading in ("## CUDA tests", "## Engine benchmark", "## Peer benchmark", "## PointMass1D at 1,024 envs"):
        assert heading in report
    assert report.count(": passed,") == 4
    assert "### Single-env `step`" in report and "### DiffGym / twin" in report
    assert "| DiffGym/FrankaReach-v0 | 64 |" in report and "| DiffGym/PointMass1D-v0 | 1024 |" in report
