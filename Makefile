# photo3d: `make run` starts the whole product locally; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BROWSER_STAMP := $(VENV)/.installed-browser
WEB_VENDOR := serve_app/static/vendor/model-viewer.min.js

export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED = 1

.PHONY: run test test-fast lint typecheck install install-dev clean bench

$(STAMP): pyproject.toml | $(WEB_VENDOR)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[embedded]'
	touch $@

$(DEV_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e '.[embedded,dev]'
	touch $@

# The web page's 3D viewer, served locally from /vendor (no CDN at run time).
$(WEB_VENDOR): package.json $(wildcard package-lock.json)
	@command -v npm >/dev/null || { echo "npm not found: the web page will have no 3D viewer (install Node.js)"; exit 0; }; \
	if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi && \
	mkdir -p $(@D) && cp node_modules/@google/model-viewer/dist/model-viewer.min.js $@

# Browser tests drive the system Chromium (apt-get install chromium) with Playwright.
$(BROWSER_STAMP): $(DEV_STAMP)
	@test -x /usr/bin/chromium || echo "note: /usr/bin/chromium is missing; tests/browser will skip"
	touch $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

## Start PostgreSQL (embedded unless DATABASE_URL is set), Ray and the app on http://127.0.0.1:8000
## MONITORING=1 also starts Prometheus (Debian's package) on http://127.0.0.1:9090
run: $(STAMP)
	$(VENV)/bin/photo3d serve $(if $(filter 1 yes true,$(MONITORING)),--monitoring)

## The whole suite: unit, integration (real PostgreSQL), e2e (real Ray Serve)
test: $(DEV_STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest tests -q

test-fast: $(DEV_STAMP)
	$(PY) -m pytest tests/unit tests/integration -q

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check serve_app tests jobs bench
	$(VENV)/bin/ruff format --check serve_app tests jobs bench

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
