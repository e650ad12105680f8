# make install: create .venv when missing and install (quick when already installed)
# make test:    install + lint + the whole test suite
# make demo:    install + the main job on the shipped demo model (assets/kaleido-shapes)
# make app:     install + the web page on the shipped demo model (http://127.0.0.1:7860)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu
export WANDB_MODE := disabled

CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test demo app lint browser bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: install
	$(PY) -m ruff check .

# The browser tests drive Debian's chromium (Playwright's own browser downloads are never used).
browser:
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: lint browser
	$(PY) -m pytest -q

demo: install
	$(PY) sample_video.py --config configs/sampling/shapes.yaml

app: install
	$(PY) app.py --config configs/sampling/shapes.yaml

bench: install
	$(PY) benchmarks/dit_forward.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
