# Set-up on a fresh machine is `make demo` or `make test`: both create .venv and install first.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch/torchvision pinned to the wheels this project is developed and tested with.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PYTHON) -m pytest tests --durations=20

demo: install
	$(PYTHON) jobs/demo.py --out runs/demo

clean:
	rm -rf runs/demo
