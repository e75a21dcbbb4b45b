# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# Every target passes its *_ARGS variable on to its command, which is how tests/test_makefile.py runs each
# one in a quick mode (e.g. `make bench BENCH_ARGS=--quick`) so that none can rot unnoticed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-open-loop results test test-slow bench bench-overhead bench-peers gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

TRAINERS := trainers/ppo trainers/apg  # the bundled trainer plugins (separate packages)

$(STAMP): $(PY) setup.cfg pyproject.toml constraints.txt $(wildcard trainers/*/setup.cfg)
	$(PIP) -e '.[test,tune,video,export,ray,newton]' $(addprefix -e ,$(TRAINERS))
	touch $(STAMP)

install: $(STAMP)

# The main job: APG vs PPO on PointMass1D under the evaluation protocol (~3 min on 2 CPU cores), evaluated
# densely early (from 1,000 env steps, each gap 1.25x the last, up to 5,000) so the ratio is resolved.
# DEMO_ARGS come last, so they override the flags before them (e.g. --env-steps 2000 --out /tmp/demo).
demo: install
	$(VENV)/bin/diffgym compare --env DiffGym/PointMass1D-v0 --algos apg,ppo --seeds 3 \
		--env-steps 100000 --eval-schedule geometric --eval-every 5000 --out runs/demo $(DEMO_ARGS)

demo-open-loop: install
	$(PY) -m diffgym.demos.open_loop $(DEMO_OPEN_LOOP_ARGS)

# Every learning-curve table and plot of docs/results.md from docs/results/experiments.yml: trains the runs
# that are missing (hours on 2 cores; resumable), rewrites the reports. RESULTS_ARGS: experiment names,
# --list, --runner ray, --workers N (docs/results.md, "Reproducing").
results: install
	$(VENV)/bin/diffgym results $(RESULTS_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# BENCH_ARGS=--quick: one task, one batch size, a smoke run
bench: install
	$(PY) benchmarks/bench_engine.py $(BENCH_ARGS)

# Per-call overhead at N = 1 against Warp's recorded-launch floor, one thread (docs/benchmarks.md).
# BENCH_OVERHEAD_ARGS=--quick for a smoke run.
bench-overhead: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_overhead.py $(BENCH_OVERHEAD_ARGS)

# DiffGym against its peers (panda-gym, gym-pusht, JAX and pure-torch twins; docs/benchmarks.md). The
# peers live in their own venv so they never enter the project's; DiffGym is installed there editable,
# with constraints.txt (CPU torch 2.13.0), and pytest for the twins' tests. BENCH_PEERS_ARGS=--quick for a smoke run.
PEERS_VENV  := .venv-peers
PEERS_PY    := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
# one thread for torch, Warp's CPU kernels and XLA (its Eigen pool and intra-op parallelism)
ONE_THREAD  := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

$(PEERS_PY):
	$(PYTHON) -m venv $(PEERS_VENV)

$(PEERS_STAMP): $(PEERS_PY) setup.cfg pyproject.toml constraints.txt benchmarks/peers-requirements.txt
	$(PEERS_PY) -m pip install --disable-pip-version-check -q -c constraints.txt \
		-r benchmarks/peers-requirements.txt -e . pytest
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(ONE_THREAD) $(PEERS_PY) benchmarks/bench_peers.py $(BENCH_PEERS_ARGS)

# CUDA tests + engine and peer benchmarks on the GPU, tables in runs/gpu-check/report.md (~8 min at
# most; benchmarks/gpu_check.py). Checked for a GPU before the peer venv is built, so a machine without
# one gets one line at once. GPU_CHECK_ARGS="--device cpu --quick" runs the same path on the CPU.
GPU_CHECK_ARGS ?=
gpu-check:
	@case "$(GPU_CHECK_ARGS)" in *"--device cpu"*) ;; *) nvidia-smi -L >/dev/null 2>&1 || { \
		echo "make gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); run it where one is" >&2; \
		exit 2; } ;; esac
	@$(MAKE) --no-print-directory $(PEERS_STAMP)
	$(ONE_THREAD) $(PEERS_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info
