# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-open-loop test test-slow bench bench-overhead clean

$(PY):
	$(PYTHON) -m venv $(VENV)

TRAINERS := trainers/ppo trainers/apg  # the bundled trainer plugins (separate packages)

$(STAMP): $(PY) setup.cfg pyproject.toml constraints.txt $(wildcard trainers/*/setup.cfg)
	$(PIP) -e '.[test,tune,video,export,ray,newton]' $(addprefix -e ,$(TRAINERS))
	touch $(STAMP)

install: $(STAMP)

# The main job: APG vs PPO on PointMass1D under the evaluation protocol (~5 min on 2 CPU cores).
demo: install
	$(VENV)/bin/diffgym compare --env DiffGym/PointMass1D-v0 --algos apg,ppo --seeds 3 \
		--env-steps 300000 --eval-every 5000 --out runs/demo

demo-open-loop: install
	$(PY) -m diffgym.demos.open_loop

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) benchmarks/bench_engine.py

# Per-call overhead at N = 1 against Warp's recorded-launch floor, one thread (docs/benchmarks.md).
bench-overhead: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
