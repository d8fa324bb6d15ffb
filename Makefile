# tximageio: the two set-up commands are `make run` and `make test`.
# Both work on a fresh Debian machine as root with nothing prepared.

PYTHON ?= python3
VENV := .venv
REFVENV := .refvenv
# Debian packages the tests use: real qemu tools, nbdkit, curl and openssl.
TEST_DEBS := qemu-utils nbdkit libnbd-bin curl openssl
PYTEST_ARGS ?=

.PHONY: run test venv refvenv debs bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || $(MAKE) --no-print-directory DEBS="python3-venv" debs
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

# The reference implementation, in its own virtualenv, for side-by-side
# tests and benchmarks. Never installed into the project's venv.
refvenv: $(REFVENV)/.installed

$(REFVENV)/.installed:
	$(PYTHON) -m venv $(REFVENV)
	$(REFVENV)/bin/pip install -q ovirt-imageio==2.5.1
	@touch $@

DEBS ?= $(TEST_DEBS)
debs:
	@missing=""; for p in $(DEBS); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: debs venv refvenv
	IMAGEIO_REFVENV=$(CURDIR)/$(REFVENV) $(VENV)/bin/pytest $(PYTEST_ARGS) test

run: venv
	$(VENV)/bin/python contrib/devrun.py

bench: debs venv refvenv
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) $(REFVENV) dev build *.egg-info
