# Two commands matter: `make run` and `make test`.  Everything installs
# itself into .venv from PyPI on first use; only python3 and make are needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)/src:$(CURDIR)
# The plugin cache is rebuilt in memory; never write dropin.cache into src/.
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test lint typecheck unit fuzz bench clean

$(BIN)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python scripts/requirements.py --dev > $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/requirements.txt
	touch $@

run: $(BIN)/.deps
	$(BIN)/twistd --nodaemon --pidfile= smtpproxy

test: lint typecheck unit

lint: $(BIN)/.deps
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(BIN)/.deps
	$(BIN)/mypy src tests bench scripts

unit: $(BIN)/.deps
	$(BIN)/trial --jobs=2 tests

fuzz: $(BIN)/.deps
	HYPOTHESIS_PROFILE=long $(BIN)/trial tests.smtp.test_properties_protocol tests.mime.test_properties_mime tests.smtp.test_commands tests.smtp.test_dotreader tests.policy.test_rules tests.smtp.test_chunking tests.test_dsn tests.mime.test_properties_bounded tests.test_logsafe

bench: $(BIN)/.deps
	$(BIN)/python bench/run.py
	$(BIN)/python bench/ab.py --peer twisted --docs
	$(BIN)/python bench/ab.py --peer smtp-sink --pairs 20 --docs
	$(BIN)/python bench/adversarial.py --docs
	$(BIN)/python bench/http_api.py
	$(BIN)/python bench/graph_cpu.py --rounds 3
	$(BIN)/python bench/mailbox.py --file
	$(BIN)/python bench/queue_ingress.py

clean:
	rm -rf $(VENV) _trial_temp* .mypy_cache .ruff_cache
