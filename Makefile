# OpenFlare: every target builds the virtualenv it needs first.
SHELL := /bin/bash

# Python >= 3.12: the interpreter named by .python-version (pyenv), else the first suitable one on PATH.
PYTHON ?= $(shell for p in python3.12 python3.13 python3.14 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PORT ?= 8080
UPSTREAM ?=
# mitmweb's UI (make web): http://$(WEB_HOST):$(WEB_PORT)/ with the token mitmweb logs at startup.
WEB_PORT ?= 8081
WEB_HOST ?= 127.0.0.1
DATA ?=
# More mitmdump/mitmweb arguments: make run ARGS="--set openflare_threshold=9". A --set wins over mitm.conf.
ARGS ?=
# make run: mitmdump workers sharing one port (SO_REUSEPORT; addons/workers.py supervises them). 1: one plain mitmdump.
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
CONFDIR := .mitmproxy
# Every addon, as one script (cheaper than seven), in the documented order: deployment, features (client
# IP, the request's fields), bans (refuse banned IPs first), scorer, recorder, labels, flowcap. See addons/openflare.py.
ADDONS := -s addons/openflare.py
MODE := $(if $(UPSTREAM),--mode reverse:$(UPSTREAM),)

.PHONY: install run web test train eval bench bench-web clean verify-log export retrain rollback bench-retrain \
	check-config check-upstream report bench-report soak

install: $(STAMP)

$(STAMP): pyproject.toml setup.py addons/_fastscore.c
	@test -n "$(PYTHON)" || { echo "Python >= 3.12 not found (pyenv install 3.12, or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# mitmproxy and openai in one pip run: installed separately, pip leaves a broken pydantic pair.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(CONFDIR)/config.yaml: mitm.conf
	mkdir -p $(CONFDIR)
	ln -sf ../mitm.conf $@

# UPSTREAM needs its scheme: without one mitmproxy speaks HTTPS to the app, and a plain-HTTP app never answers.
check-upstream:
	@case '$(UPSTREAM)' in \
	  ''|http://?*|https://?*) ;; \
	  *) echo "UPSTREAM=$(UPSTREAM): give the scheme, e.g. UPSTREAM=http://$(UPSTREAM) (or https://...):" \
	       "without one mitmproxy speaks HTTPS to the app and a plain-HTTP app never answers" >&2; exit 2;; \
	esac

run: check-upstream $(STAMP) $(CONFDIR)/config.yaml
	$(if $(filter 1,$(WORKERS)),$(BIN)/mitmdump,$(BIN)/python -m addons.workers --workers $(WORKERS) --) --set confdir=$(CONFDIR) -p $(PORT) $(MODE) $(ADDONS) $(ARGS)

web: check-upstream $(STAMP) $(CONFDIR)/config.yaml
	$(BIN)/mitmweb --set confdir=$(CONFDIR) -p $(PORT) --set web_port=$(WEB_PORT) --set web_host=$(WEB_HOST) \
		$(MODE) $(ADDONS) $(ARGS)

# Check mitm.conf (or FILE=...) as mitmdump reads it, plus ARGS="--set k=v ...": unknown keys, wrong types.
check-config: $(STAMP)
	$(BIN)/python -m addons.configcheck $(or $(FILE),mitm.conf) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

train: $(STAMP)
	$(BIN)/python scripts/train.py $(if $(DATA),--data $(DATA),)

eval: $(STAMP)
	$(BIN)/python scripts/eval.py $(if $(DATA),--data $(DATA),)

# mitmweb under load for MINUTES (default 30) with the flow cap: RSS over time (ARGS: more options).
bench-web: $(STAMP)
	$(BIN)/python scripts/bench_web.py $(if $(MINUTES),--minutes $(MINUTES),) $(ARGS)

# The bundle `make run` loads against plain mitmdump on the shared datasets' test splits (none: it stops; ARGS=--builtin-mix
# for a smoke run), each addon on its own, a size sweep through the proxy; then the checks below.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)
	# the recorder's burst: 10,000 requests -> exactly 10,000 records, hash chain intact
	$(BIN)/python scripts/bench_recorder.py --requests 0
	# hostile bodies (a gzip bomb, unclosed comments, deep nesting): milliseconds each, memory
	$(BIN)/python scripts/bench_hostile.py
	# workers: requests/s of 1 and 2 workers on one port, paired rounds; the load generator's CPU share stated
	$(BIN)/python scripts/bench_workers.py
	# openflare+metrics: the bundle with and without the metrics addon (scraped every second), paired rounds
	$(BIN)/python scripts/bench_metrics.py

# The bundle under steady load for REQUESTS (default 500,000): RSS and CPU per request every 50,000 (a benchmark, not a test).
soak: $(STAMP)
	$(BIN)/python scripts/soak.py $(if $(REQUESTS),--requests $(REQUESTS),) $(ARGS)

# Walk the records' hash chains (OPENFLARE_MONGO_URI, else the embedded store in data/records).
verify-log: $(STAMP)
	$(BIN)/python scripts/verify_log.py

# The records of the last SINCE (default 7d) as one HTML file: make report [SINCE=1d] [OUT=week.html]
report: $(STAMP)
	$(BIN)/openflare report --since $(or $(SINCE),7d) --out $(or $(OUT),report.html) $(ARGS)

# Export full records as dataset JSON Lines: make export OUT=flows.jsonl
export: $(STAMP)
	$(BIN)/python scripts/export_records.py $(if $(OUT),--out $(OUT),)

# Retrain on the base corpora + labelled recorded flows; promote only if not worse (ARGS: more options).
retrain: $(STAMP)
	$(BIN)/python scripts/retrain.py $(if $(DATA),--data $(DATA),) $(ARGS)

# Return the current model to its parent version (running proxies follow within a second).
rollback: $(STAMP)
	$(BIN)/python scripts/rollback.py

# `openflare report` on the retrain benchmark's 1,000,000-record store: wall time and peak memory (FLOWS=...).
bench-report: $(STAMP)
	$(BIN)/python scripts/bench_report.py $(if $(FLOWS),--flows $(FLOWS),)

# Retrain on 1,000,000 synthetic recorded flows: wall time and peak memory (FLOWS=... to change).
bench-retrain: $(STAMP)
	$(BIN)/python scripts/bench_retrain.py $(if $(FLOWS),--flows $(FLOWS),) $(if $(DATA),--data $(DATA),)

clean:
	rm -rf $(VENV) $(CONFDIR) .pytest_cache .hypothesis build addons/*.so
