# make run   - start the web app at http://127.0.0.1:7860 (installs what it needs first)
# make test  - create .venv, install everything (Chromium for the browser test too) and run pytest
# make screenshots - remake docs/screenshot.png, grounding.png, pdf-pages.png, json-mode.png from the current page
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
ARGS   ?=

.PHONY: run test install install-dev browser bench screenshots clean

$(VENV)/.installed: requirements.txt requirements-common.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Debian's Chromium for the Playwright browser test (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "note: install Debian's chromium for the browser test (sudo apt-get install chromium)"; fi; }

run: install
	$(PY) app.py $(ARGS)

test: install-dev browser
	$(PY) -m pytest -q $(ARGS)

bench: install-dev
	$(PY) bench/overhead.py --model tiny
	$(PY) bench/concurrency.py --model tiny --clients 1,2,4,8

screenshots: install-dev browser
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache test-output
