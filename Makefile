# The two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian tools the tests and the benchmark drive as real clients and peers.
DEBIAN_TOOLS := curl wrk socat haproxy nginx-light hatop prometheus-haproxy-exporter
# Command names that tell whether each of those is already there.
TOOL_COMMANDS := curl wrk socat haproxy nginx hatop prometheus-haproxy-exporter

.PHONY: run test venv debian-tools lint bench bench-state bench-upgrade clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Starts the demo backends (127.0.0.1:9001 and :9002), then pylb in the foreground.
run: venv
	@mkdir -p run
	@trap 'kill $$s1 $$s2 2>/dev/null' EXIT INT TERM; \
	$(PY) bin/demo-backend 9001 s1 & s1=$$!; \
	$(PY) bin/demo-backend 9002 s2 & s2=$$!; \
	$(PY) bin/pylb -f conf/lb.cfg

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
	$(VENV)/bin/ruff check lb tests bench bin/pylb bin/demo-backend

test: venv debian-tools lint
	@mkdir -p run
	PATH="$$PATH:/usr/sbin" $(VENV)/bin/pytest -q

bench: venv debian-tools
	PATH="$$PATH:/usr/sbin" $(PY) bench/bench.py

# Start, reload, respawn and takeover times with a growing stick table and map (several minutes).
bench-state: venv debian-tools
	PATH="$$PATH:/usr/sbin" $(PY) bench/state.py

# Servers killed and restarted under load (outage, rolling restart), pylb vs HAProxy (~3 min).
bench-upgrade: venv debian-tools
	PATH="$$PATH:/usr/sbin" $(PY) bench/upgrade.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache run/*.pid run/*.sock
