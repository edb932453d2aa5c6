# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo lint clean-venv

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@avail_kib=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ "$$avail_kib" -lt 10485760 ]; then \
	  echo "warning: $$((avail_kib / 1048576)) GiB free on this disk; .venv takes about 7 GiB and make test up to 3 GiB of temporary files" >&2; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Two workers: a training job's two ranks leave a core idle while they import, rendezvous, build or wait, and the
# other worker's job uses it (tests/work_units.py keeps each module on one worker). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(PY) -m biomedgpt.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check biomedgpt tests slurm benchmarks

clean-venv:
	rm -rf $(VENV)
