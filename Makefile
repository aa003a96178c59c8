# The README's two commands: `make demo` and `make test`. Each creates .venv/ when missing.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# pyproject.toml extras: a Slurm cluster adds `slurm` (make venv EXTRAS=pipeline,dev,slurm), the
# Snakemake executor plugin; left out elsewhere, as it probes for a Slurm controller on every
# Snakemake start (up to 10 s where Slurm is installed but not running).
EXTRAS ?= pipeline,dev
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml constraints.txt; echo $(EXTRAS)) | sha1sum | cut -c1-12)

.PHONY: venv test test-fast demo lint clean-demo

venv: $(STAMP)

# uv when it can (about 20 s instead of pip's 100 s), pip otherwise: workflow/install_venv.py
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	python3 workflow/install_venv.py $(VENV) $(EXTRAS) constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -c "from importlib.metadata import version as v; t, tv = v('torch'), v('torchvision'); \
	  assert t.startswith('2.14.1') and tv.startswith('0.29.1'), (t, tv)"
	rm -f $(VENV)/.installed-*; touch $@

# One pytest worker per core (pytest-xdist): the unit tests are mostly single-threaded, and the
# end-to-end tests (the demo DAG, the long trainings) fill both cores between them.
test: venv
	$(BIN)/ruff check omniad tests benchmarks workflow
	$(BIN)/pytest -q -n auto

test-fast: venv
	$(BIN)/pytest -q -n auto -m "not slow"

# Through DVC (which runs Snakemake), so dvc.lock is written and `dvc status` is clean after it;
# the protocol is params/protocols.yaml's `default` (demo). Without git (a tarball) DVC cannot
# run: Snakemake alone then. Timed from the start, venv creation included (a newcomer's wall
# time), printed at the end.
demo:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory venv && \
	{ test "$$($(BIN)/python -c 'import yaml; print(yaml.safe_load(open("params/protocols.yaml"))["default"])')" = demo \
	  || { echo "make demo: params/protocols.yaml default is not demo"; exit 1; }; } && \
	if git rev-parse --git-dir >/dev/null 2>&1; then PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro; \
	else PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all --config protocol=demo; fi && \
	$(BIN)/python -m omniad.cli where --protocol demo; \
	rc=$$?; t=$$(( $$(date +%s) - start )); \
	echo "[demo] total wall time: $$((t / 60)) min $$((t % 60)) s (exit $$rc)"; exit $$rc

lint: venv
	$(BIN)/ruff check omniad tests benchmarks workflow
