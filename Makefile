# Build and test entry points for the pitr.postgresql collection.
#
#   make test        everything CI runs: bootstrap lint sanity unit integration molecule
#   make help        the list of targets
#
# Works on a fresh Debian 12 machine as root (or with sudo): `make bootstrap` installs the
# Debian packages and the .venv the other targets need, and is quick when that is done.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

ROOT := $(CURDIR)
SYSTEM_PYTHON := /usr/bin/python3
VENV := $(ROOT)/.venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
REQUIREMENTS := requirements-dev.txt
VENV_STAMP := $(VENV)/.requirements-dev.stamp

# Tools from .venv come first for every recipe and for the scripts they call; the python
# first on the machine's PATH may be a version-manager shim.
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DEBIAN_FRONTEND := noninteractive

APT_PACKAGES := postgresql postgresql-contrib python3-venv python3-psycopg python3-zstandard \
	python3-crc32c libisal2 python3-lz4 zstd lz4 pgbackrest podman runc debootstrap uidmap fuse-overlayfs rsync sudo git \
	openssh-client \
	shellcheck
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) apt-get -o DPkg::Lock::Timeout=600

# This checkout as the collection pitr.postgresql, for ansible-playbook, pytest and mypy.
COLLECTIONS_DIR := build/collections
COLLECTION_LINK := $(COLLECTIONS_DIR)/ansible_collections/pitr/postgresql
# ansible-test runs from a copy laid out as ansible_collections/pitr/postgresql.
SANITY_DIR := build/sanity/ansible_collections/pitr/postgresql

PYTHON_DIRS = $(wildcard plugins tests benchmarks tools)
MYPY := $(BIN)/mypy --config-file $(ROOT)/pyproject.toml --cache-dir $(ROOT)/build/mypy-cache
# benchmarks/ holds scripts that import each other by file name; mypy stops on a directory
# without Python files, so it is checked only once it has some.
HAVE_BENCHMARKS = $(shell find benchmarks -name '*.py' -print -quit 2>/dev/null)

# Run pytest on $(1). A suite that does not exist yet, or has no tests yet (pytest's exit
# status 5, "no tests collected"), is not a failure: say so and go on.
define run_pytest
	@if [ ! -d $(1) ]; then echo "pytest: there is no $(1) yet; nothing to run"; exit 0; fi; \
	status=0; $(BIN)/pytest $(1) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest: no tests collected in $(1); nothing to run yet"; status=0; fi; \
	exit $$status
endef

.PHONY: help bootstrap system-packages venv collection-link lint sanity sanity-tree get-pip-cache \
	unit integration molecule test demo bench clean distclean

help:
	@echo "Targets:"
	@echo "  bootstrap     Debian packages, .venv from $(REQUIREMENTS), collection link"
	@echo "  lint          ruff (check, format), mypy, ansible-lint (production profile)"
	@echo "  sanity        ansible-test sanity --python 3.11 --requirements"
	@echo "  unit          pytest tests/unit"
	@echo "  integration   pytest tests/integration (real PostgreSQL 15 clusters)"
	@echo "  molecule      molecule scenarios in podman containers (tools/run-molecule.sh)"
	@echo "  test          all of the above, as CI runs it (.ci/run)"
	@echo "  demo          tools/demo.sh"
	@echo "  bench         benchmarks/run.py"
	@echo "  clean         remove build output and caches (keeps .venv); distclean removes .venv too"

# ---------------------------------------------------------------------------------------------
# Bootstrap

bootstrap: system-packages venv collection-link

# apt-get runs only when a package is missing: dpkg-query alone takes milliseconds.
system-packages:
	@installed=$$(dpkg-query -W -f='$${Package} $${db:Status-Abbrev}\n' $(APT_PACKAGES) 2>/dev/null || true); \
	missing=""; \
	for package in $(APT_PACKAGES); do \
		grep -qx "$$package ii *" <<<"$$installed" || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		$(APT_GET) update -q; \
		$(APT_GET) install -y -q $$missing; \
	fi

venv: $(VENV_STAMP)

$(PYTHON): | system-packages
	$(SYSTEM_PYTHON) -m venv $(VENV)

$(VENV_STAMP): $(REQUIREMENTS) | $(PYTHON)
	$(PYTHON) -m pip install --quiet --requirement $(REQUIREMENTS)
	touch $@

collection-link:
	@if [ "$$(readlink $(COLLECTION_LINK) 2>/dev/null)" != "../../../.." ]; then \
		rm -rf $(COLLECTION_LINK); \
		mkdir -p $(dir $(COLLECTION_LINK)); \
		ln -s ../../../.. $(COLLECTION_LINK); \
		echo "Linked $(COLLECTION_LINK) -> checkout"; \
	fi

# ---------------------------------------------------------------------------------------------
# Static checks

# Every linter runs even when an earlier one fails, so one run shows all findings.
lint: bootstrap
	@status=0; \
	echo "== ruff check"; $(BIN)/ruff check $(PYTHON_DIRS) || status=1; \
	echo "== ruff format --check"; $(BIN)/ruff format --check $(PYTHON_DIRS) || status=1; \
	echo "== mypy plugins"; \
	( cd $(COLLECTIONS_DIR) && $(MYPY) ansible_collections/pitr/postgresql/plugins ) || status=1; \
	if [ -n "$(HAVE_BENCHMARKS)" ]; then \
		echo "== mypy benchmarks"; \
		( cd benchmarks && MYPYPATH=$(ROOT)/$(COLLECTIONS_DIR) $(MYPY) . ) || status=1; \
	fi; \
	echo "== ansible-lint"; $(BIN)/ansible-lint $$([ -t 1 ] || echo --nocolor) || status=1; \
	exit $$status

# ansible-test wants the collection under ansible_collections/<namespace>/<name>/, and it lists
# the files to test with git from the nearest .git above the tree. The tree is a fresh copy of
# what git would commit here (tracked and untracked files, minus what .gitignore leaves out),
# made a git repository of its own so that ansible-test lists exactly those files rather
# than asking this checkout, which ignores build/.
sanity-tree:
	@rm -rf $(SANITY_DIR)
	@mkdir -p $(SANITY_DIR)
	@git ls-files -z --cached --others --exclude-standard \
		| rsync -a --from0 --files-from=- --ignore-missing-args ./ $(SANITY_DIR)/
	@git -C $(SANITY_DIR) init -q
	@git -C $(SANITY_DIR) add -A

# The cache file name carries the pip version this ansible-test bootstraps (24.2 for 2.19).
get-pip-cache: venv
	@requirements_py=$$($(PYTHON) -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py; \
	pip_version=$$(grep -oE "pip='[0-9.]+'" "$$requirements_py" | head -n 1 | tr -dc '0-9.'); \
	if [ -z "$$pip_version" ]; then \
		echo "Cannot tell which get-pip version ansible-test wants (looked in $$requirements_py)" >&2; exit 1; \
	fi; \
	install -D -m 0644 tools/get_pip_stand_in.py "$$HOME/.ansible/test/cache/get_pip_$${pip_version//./_}.py"

sanity: bootstrap get-pip-cache sanity-tree
	cd $(SANITY_DIR) && $(BIN)/ansible-test sanity --python 3.11 --requirements --color no

# ---------------------------------------------------------------------------------------------
# Tests

unit: bootstrap
	$(call run_pytest,tests/unit)

integration: bootstrap
	$(call run_pytest,tests/integration)

molecule: bootstrap
	@if [ -f tools/run-molecule.sh ]; then \
		bash tools/run-molecule.sh; \
	else \
		echo "tools/run-molecule.sh is not in the tree yet: no molecule scenario to run"; \
	fi

test: bootstrap lint sanity unit integration molecule

# ---------------------------------------------------------------------------------------------
# Showing and measuring

demo: bootstrap
	bash tools/demo.sh

# Each benchmark measures its baselines in the same run and writes a table plus raw JSON under
# benchmarks/results/. Not part of `make test`: tests never assert on time.
bench: bootstrap
	$(PYTHON) benchmarks/run.py
	$(PYTHON) benchmarks/backup_bench.py
	$(PYTHON) benchmarks/restore_bench.py
	$(PYTHON) benchmarks/dump_bench.py

# ---------------------------------------------------------------------------------------------

clean:
	rm -rf build tests/output .mypy_cache .ruff_cache .pytest_cache .ansible
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
