# Each target sets up what it needs by itself, idempotently:
#   system EGL/Mesa libraries (offscreen MuJoCo) when missing, and a virtual environment in .venv
#   whose install is redone only when pyproject.toml changes.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-$(shell sha1sum pyproject.toml | cut -c1-12)
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: demo test test-fast bench sysdeps venv clean

sysdeps:
	@bash scripts/install_sysdeps.sh

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build, so that transformers does not pull a CUDA build.
	$(VPY) -m pip install -q "torch==2.13.0"
	# the tpu extra: libtpu, which the AOT plan tests (tests/aot) compile TPU programs with, on this CPU.
	$(VPY) -m pip install -q -e ".[test,tpu]"
	@rm -f $(VENV)/.stamp-*; touch $@

venv: $(STAMP)

# The CPU demo: render a small dataset, train a tiny model through the curriculum, evaluate, report.
demo: venv
	$(VPY) -m dig_jax.demo --workdir=demo_out

# The whole suite, slow tests included (CI runs exactly this).
test: venv
	$(VPY) -m pytest -q tests

test-fast: venv
	$(VPY) -m pytest -q -m "not slow" tests

bench: venv
	$(VPY) benchmarks/render_throughput.py
	$(VPY) benchmarks/model_vs_hf.py
	$(VPY) benchmarks/train_step.py
	$(VPY) benchmarks/demo_learnability.py
	$(VPY) benchmarks/reward_by_count.py
	# which changes the demo's warm-up sees (needs make demo's workdir)
	$(if $(wildcard demo_out/run/eval),$(VPY) benchmarks/change_visibility.py --workdir=demo_out,)
	# from make demo's warm-up when demo_out holds one (else the script runs the warm-up itself)
	$(VPY) benchmarks/curriculum_ablation.py $(if $(wildcard demo_out/run/checkpoints),--demo-dir=demo_out,)
	$(VPY) benchmarks/aot_plan.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
