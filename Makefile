# fastcache — build, test and run. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := fuse libfuse-dev pkg-config libxxhash-dev rsync postgresql-15
BENCH_APT_PACKAGES := fio s3fs
EXT_SOURCES := $(wildcard ext/*.pyx ext/*.pxd ext/*.h)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all deps bench-deps venv build dev-setup test test-verbose test-race test-long bench bench-smoke \
        lint annotate clean run-coordinator run-client-1 run-client-2 run-client-3 \
        dev-start dev-stop install-mount-helper

all: build

## deps: Debian packages (fuse for fusermount, headers for llfuse, libxxhash for the hashing,
## rsync for the tests that copy extended attributes with rsync -aX, postgresql-15 for the
## PostgreSQL store's tests and `make dev-start STORE=postgres`)
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing"; \
	    echo "run: sudo apt-get update && sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

bench-deps: deps
	@missing=""; for p in $(BENCH_APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

## venv: the virtualenv with build, runtime and test dependencies
$(VENV)/.installed: pyproject.toml | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel "Cython>=3.0" "numpy>=1.26"
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

## build: compile the Cython extensions in place
fastcache/.built: $(VENV)/.installed setup.py $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: deps fastcache/.built

## dev-setup: build, and as root the mount(8) helper too
dev-setup: build
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory install-mount-helper; fi

## install-mount-helper: /sbin/mount.fastcache -> the venv's helper, so that
## `mount -t fastcache` and /etc/fstab lines work (root; docs/operations.md)
install-mount-helper: venv
	ln -sfn $(abspath $(VENV))/bin/mount.fastcache /sbin/mount.fastcache

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory bench-smoke

test-verbose: build
	$(PY) -m pytest -v $(PYTEST_ARGS)

## test-long: the randomised mount tests with a long, random budget (a failure prints the
## shrunk steps and a @reproduce_failure blob); `make test` runs them briefly, seed fixed
test-long: build
	FASTCACHE_TEST_LONG=1 $(PY) -m pytest -v -p no:randomly tests/mount/test_model_fs.py --timeout 7200 $(PYTEST_ARGS)

## test-race: the concurrency stress tests with Python's dev mode and asyncio debug
test-race: build
	PYTHONDEVMODE=1 PYTHONASYNCIODEBUG=1 $(PY) -m pytest -v -m race $(PYTEST_ARGS)

## bench-smoke: the kernel benchmarks, briefly; never fails on timing
bench-smoke: build
	@mkdir -p bench/results
	$(PY) -m pytest -q bench/test_kernels.py --benchmark-min-rounds=1 --benchmark-max-time=0.05 \
	  --benchmark-warmup=off --benchmark-json=bench/results/kernels-smoke.json -p no:randomly \
	  -o testpaths=bench

## bench: kernel benchmarks, then the whole-filesystem harness (BENCH_ARGS="--help" lists its flags)
bench: build bench-deps
	$(PIP) install -q -e '.[bench]' --no-build-isolation
	@mkdir -p bench/results
	$(PY) -m pytest -q bench/test_kernels.py bench/test_peer_fetch.py \
	  --benchmark-json=bench/results/kernels.json -o testpaths=bench
	$(PY) -m bench.harness $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check fastcache tests bench
	$(VENV)/bin/ruff format --check fastcache tests bench

annotate: venv
	$(VENV)/bin/cython -a -3 ext/*.pyx

run-coordinator: build
	$(VENV)/bin/fastcache coordinator --host 127.0.0.1 --port 8080 --state-dir .dev/coordinator

## run-client-N: client N on :808N mounted at /tmp/fuse-clientN. S3 is the dev cluster's
## embedded server when .dev/s3-info.json exists, else whatever the AWS_* variables say.
run-client-1 run-client-2 run-client-3: run-client-%: build
	@if [ -f .dev/s3-info.json ]; then eval "$$($(PY) -c 'import json; d = json.load(open(".dev/s3-info.json")); \
	  print("export AWS_ENDPOINT_URL=%s AWS_ACCESS_KEY_ID=%s AWS_SECRET_ACCESS_KEY=%s" % (d["endpoint"], d["access_key"], d["secret_key"]))')"; fi; \
	mkdir -p /tmp/fuse-client$*; \
	exec $(VENV)/bin/fastcache client --coordinator http://127.0.0.1:8080 --host 127.0.0.1 \
	  --port $$((8080 + $*)) --peer-id client$* --nvme-dir .dev/nvme$* --mount /tmp/fuse-client$*

dev-start: build
	$(VENV)/bin/fastcache dev-start $(if $(STORE),--store $(STORE))

dev-stop:
	@if [ -x $(VENV)/bin/fastcache ]; then $(VENV)/bin/fastcache dev-stop; else echo "nothing to stop"; fi

clean:
	rm -rf build fastcache/*.so fastcache/.built ext/*.c ext/*.html .pytest_cache .benchmarks
	find . -name __pycache__ -prune -exec rm -rf {} +
