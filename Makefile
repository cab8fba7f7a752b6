# cachemode: two commands for a fresh Debian machine with Python 3.11, as root.
#   make demo   set up, then serve the demo image over NBD and show a client session against it
#   make test   set up everything (Debian peers and the guest kernel included) and run the whole suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := qemu-utils libnbd-bin python3-libnbd nbdkit fio strace valgrind nbd-client \
          qemu-system-x86 busybox-static e2fsprogs sqlite3 openssl gcc python3-dev time
BUILD_DEBS := gcc python3-dev
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench debs venv clean

# install those of the Debian packages $(1) that are missing
apt_install = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

# the CPU simulator's core and the NBD server's loop for runs of small requests are C, compiled when the
# package installs: a compiler and Python's headers first
$(STAMP): pyproject.toml src/cachemode/cpu/_core.c src/cachemode/nbd/_batch.c
	@$(call apt_install,$(BUILD_DEBS))
	@echo "cachemode: creating the virtualenv $(VENV) (once)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "cachemode: installing cachemode and its dependencies (numpy, matplotlib, ...; compiling the CPU simulator's core; a minute or two the first time)"
	$(PY) -m pip install --progress-bar off -e '.[dev]'
	@echo "cachemode: installed in $(VENV)"
	touch $(STAMP)

debs:
	@$(call apt_install,$(DEBS))

demo: $(STAMP)
	$(VENV)/bin/cachemode demo

test: debs $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/cachemode vm setup
	$(PY) -m pytest -n 2 --dist loadgroup -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: debs $(STAMP)
	$(PY) bench/nbd_bench.py
	$(PY) bench/cpu_bench.py
	$(PY) bench/explore_bench.py

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache src/cachemode/cpu/_core.*.so src/cachemode/nbd/_batch.*.so
