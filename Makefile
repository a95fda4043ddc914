# The two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian tools the tests and the benchmark drive as real clients and peers.
DEBIAN_TOOLS := curl wrk socat openssl haproxy nginx-light hatop prometheus-haproxy-exporter \
  prometheus chromium systemd
# Command names that tell whether each of those is already there.
TOOL_COMMANDS := curl wrk socat openssl haproxy nginx hatop prometheus-haproxy-exporter \
  promtool chromium systemd-analyze

# The hot path Cython compiles (setup.py, lb/compiled.py): each .pxd and its .py.
HOT_SOURCES := $(wildcard lb/*.pxd) $(patsubst %.pxd,%.py,$(wildcard lb/*.pxd))
# Tests run a second time on the pure-Python hot path, the compiled one's fallback.
PURE_TESTS := tests/test_h1.py tests/test_http.py tests/test_corpus.py tests/test_retry.py \
  tests/test_persistence.py tests/test_tunnel_move.py tests/test_requestlog.py tests/test_rules.py \
  tests/test_upgrade.py tests/test_tls.py tests/test_https_rules.py tests/test_streamtunnel.py \
  tests/test_server_tls.py tests/test_dashboard.py

.PHONY: run test venv build-tools debian-tools lint bench bench-state bench-upgrade clean certs

venv: $(STAMP)

# Installing also compiles the hot path, in place; again whenever its sources change.
$(STAMP): setup.cfg pyproject.toml setup.py $(HOT_SOURCES) | build-tools
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# A C compiler and the Python headers, to compile the hot path: installed when run as
# root; without them pylb runs as pure Python.
build-tools:
	@if ! command -v cc >/dev/null 2>&1 || ! $(PYTHON) -c "import os, sys, sysconfig; \
	    sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing gcc and python3-dev (to compile the hot path)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3-dev >/dev/null; \
	  else echo "no C compiler or Python headers: pylb runs as pure Python (apt-get install gcc python3-dev)"; fi; \
	fi

# Starts the demo backends (127.0.0.1:9001 and :9002), then pylb in the foreground.
run: venv
	@mkdir -p run
	@trap 'kill $$s1 $$s2 2>/dev/null' EXIT INT TERM; \
	$(PY) bin/demo-backend 9001 s1 & s1=$$!; \
	$(PY) bin/demo-backend 9002 s2 & s2=$$!; \
	$(PY) bin/pylb -f conf/lb.cfg

# A self-signed ECDSA P-256 certificate for localhost, to try a TLS bind (see conf/lb.cfg).
certs: run/certs/demo.pem

run/certs/demo.pem:
	@mkdir -p run/certs
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
	  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
	  -keyout $@.key -out $@.tmp 2>/dev/null
	cat $@.key >> $@.tmp && rm $@.key && mv $@.tmp $@

# Installs missing Debian tools when run as root (elsewhere, says which are missing).
debian-tools:
	@missing=""; for c in $(TOOL_COMMANDS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian tools:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_TOOLS) >/dev/null; \
	else echo "missing tools:$$missing (install: apt-get install $(DEBIAN_TOOLS))"; exit 1; fi

lint: venv
	$(VENV)/bin/ruff check lb tests bench bin/pylb bin/demo-backend setup.py

test: venv debian-tools lint
	@mkdir -p run
	PATH="$$PATH:/usr/sbin" $(VENV)/bin/pytest -q
	PATH="$$PATH:/usr/sbin" PYLB_PURE=1 $(VENV)/bin/pytest -q $(PURE_TESTS)

bench: venv debian-tools
	PATH="$$PATH:/usr/sbin" $(PY) bench/bench.py

# Start, reload, respawn and takeover times with a growing stick table and map (several minutes).
bench-state: venv debian-tools
	PATH="$$PATH:/usr/sbin" $(PY) bench/state.py

# Servers killed and restarted under load (outage, rolling restart), pylb vs HAProxy (~3 min).
bench-upgrade: venv debian-tools
	PATH="$$PATH:/usr/sbin" $(PY) bench/upgrade.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache run/*.pid run/*.sock build \
	  lb/*.c lb/*.so lb/_compiled.json
