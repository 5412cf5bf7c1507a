# The README's commands: `make serve` (run corral with a demo account) and `make test`.
# Both create .venv with `python3 -m venv` when it is missing and install corral into it
# (editable, with the dev extras, at the versions pinned in constraints.txt); the install is
# redone only when pyproject.toml or constraints.txt changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
SERVE_ARGS ?=
PYTEST_ARGS ?=
# The suite runs in parallel (pytest-xdist): most tests wait on sockets and subprocesses,
# so more workers than cores pay off. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 4
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadscope)

.PHONY: serve test lint typecheck install screenshots lock

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Re-pin constraints.txt to what .venv holds (after adding or upgrading a dependency there:
# `.venv/bin/pip install -U <package>`, run the suite, then `make lock`).
lock: | $(BIN)/python
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
		--disable-pip-version-check | grep -v '^corral=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

serve: $(STAMP)
	$(BIN)/corral serve --demo $(SERVE_ARGS)

# SQLite first; then, when CORRAL_TEST_DATABASE_URL is set (CI: PostgreSQL), every test that
# uses the test database again (tests/conftest.py: --database-bound-only; the others, such as
# the console's browser tests against `corral serve --demo` on its own SQLite, ran once).
test: $(STAMP)
	env -u CORRAL_TEST_DATABASE_URL $(BIN)/pytest $(XDIST) $(PYTEST_ARGS)
	@if [ -n "$$CORRAL_TEST_DATABASE_URL" ]; then \
		echo "== the database-bound tests again on $$CORRAL_TEST_DATABASE_URL"; \
		$(BIN)/pytest $(XDIST) --database-bound-only $(PYTEST_ARGS); \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# DESIGN §4.10: strict typing on the domain-free and transport layers
typecheck: $(STAMP)
	$(BIN)/mypy --strict src/corral/kit src/corral/bus src/corral/transports src/corral/events \
		src/corral/sessions src/corral/metering src/corral/device src/corral/cluster

# PNGs of the console's main pages (1280 px and phone width) in screenshots/, taken by
# headless Chromium (the Debian package) against a fresh `corral serve --demo`
screenshots: $(STAMP)
	$(BIN)/python tests/console/screenshots.py screenshots
