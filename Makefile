# make install: create .venv when missing and install (quick when already installed)
# make test:    install + lint + the whole test suite
# make demo:    install + the main job on the shipped demo model (assets/kaleido-shapes)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu
export WANDB_MODE := disabled

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

demo: install
	$(PY) sample_video.py --config configs/sampling/shapes.yaml

bench: install
	$(PY) benchmarks/dit_forward.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
