# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAGESTORE := $(VENV)/bin/stagestore
DEMO   := .demo
DEMO_KEY := 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f

.PHONY: help venv demo check test test-long bench schemas docs clean

help:
	@echo "make demo       create .venv, install, run the example pipeline twice, verify, diff;"
	@echo "                then an item run and its failure report, the built-in kinds, a remote"
	@echo "make check      the fast tier while developing (under a minute): unit and in-process"
	@echo "                tests, without the fault sweeps, real servers and subprocess-heavy suites"
	@echo "make test       create .venv, install with test dependencies, run the test suite"
	@echo "make test-long  the slow soak tests too"
	@echo "make bench      the benchmark suite against b3sum, zstd, DVC, Snakemake and the floors (about"
	@echo "                50 min on 2 cores; the first run installs dvc and snakemake into"
	@echo "                benchmarks/.venv-dvc and .venv-snakemake); writes"
	@echo "                benchmarks/results/latest.json (see benchmarks/README.md)"
	@echo "make schemas    regenerate schemas/*.json from the record types"
	@echo "make docs       regenerate docs/cli.md from the commands' help, docs/errors.md from"
	@echo "                stagestore/errors.py, docs/api.md from the public API's docstrings"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The full expression: a second -m replaces addopts' `-m 'not slow'`, it does not add to it.
# Two workers (pytest-xdist): the tier is about 75 s of CPU, split over the machine's 2 cores.
check: venv
	$(PY) -m pytest -q -m 'not slow and not heavy' -x -n 2

test: venv
	$(PY) -m pytest -q

test-long: venv
	$(PY) -m pytest -q -m slow

bench: venv
	$(PY) -m benchmarks --json benchmarks/results/latest.json

schemas: venv
	$(STAGESTORE) schema --out schemas

demo: venv
	@rm -rf $(DEMO) && mkdir -p $(DEMO) && cp -r examples/docs-pipeline $(DEMO)/workspace
	@echo "== 1. run the six-stage example pipeline (run-1)"
	$(STAGESTORE) run -p $(DEMO)/workspace/stagestore.toml --run-id run-1 --jobs 2
	@echo "== 2. run it again unchanged: every stage is reused, nothing executes (run-2)"
	$(STAGESTORE) run -p $(DEMO)/workspace/stagestore.toml --run-id run-2
	$(STAGESTORE) show run-2 -p $(DEMO)/workspace/stagestore.toml
	@echo "== 3. add a document to the corpus; status says what would execute and why"
	@printf 'Demo note.\nA document added between two runs links to [[overview]] and [[hashing]].\n' \
		> $(DEMO)/workspace/corpus/demo-note.txt
	$(STAGESTORE) status -p $(DEMO)/workspace/stagestore.toml
	@echo "== 4. run again (run-3)"
	$(STAGESTORE) run -p $(DEMO)/workspace/stagestore.toml --run-id run-3 --jobs 2
	@echo "== 5. verify re-hashes every object and cross-checks every manifest"
	$(STAGESTORE) verify -p $(DEMO)/workspace/stagestore.toml
	@echo "== 6. what changed between run-1 and run-3, and why"
	$(STAGESTORE) diff run-1 run-3 -p $(DEMO)/workspace/stagestore.toml
	@echo "== 7. the answers to the queries, checked out of the store"
	$(STAGESTORE) checkout run-3 serve --to $(DEMO)/out -p $(DEMO)/workspace/stagestore.toml
	@head -20 $(DEMO)/out/results
	@echo "== 8. an item run: 12 items through fetch and build, in sampling mode, into its own store"
	@echo "   (some items fail on purpose, so the run exits 1; see docs/failures.md)"
	@cp -r examples/item-run $(DEMO)/item-run
	$(STAGESTORE) run -p $(DEMO)/item-run/stagestore.toml --store $(DEMO)/item-store \
		--items $(DEMO)/item-run/items.txt --run-id demo-items --execution-mode sampling --jobs 2 \
		|| test $$? -eq 1
	@echo "== 9. the failure report of that run: by stage, build failures by class, infrastructure, per item"
	$(STAGESTORE) report demo-items --store $(DEMO)/item-store
	@echo "== 10. built-in kinds: a folder checksummed, compressed, encrypted, decrypted, decompressed"
	@cp -r examples/kinds $(DEMO)/kinds
	DEMO_KEY=$(DEMO_KEY) $(STAGESTORE) check -p $(DEMO)/kinds/stagestore.toml
	DEMO_KEY=$(DEMO_KEY) $(STAGESTORE) plan -p $(DEMO)/kinds/stagestore.toml
	DEMO_KEY=$(DEMO_KEY) $(STAGESTORE) run -p $(DEMO)/kinds/stagestore.toml --run-id kinds-1
	$(STAGESTORE) checkout kinds-1 unpack --to $(DEMO)/kinds-out -p $(DEMO)/kinds/stagestore.toml
	diff -r $(DEMO)/kinds/data $(DEMO)/kinds-out/delivery && echo "unpacked folder identical to data/"
	$(STAGESTORE) checkout kinds-1 sums --to $(DEMO)/kinds-sums -p $(DEMO)/kinds/stagestore.toml
	cd $(DEMO)/kinds/data && sha256sum -c ../../kinds-sums/sha256
	@echo "== 11. a remote (a folder here; s3://BUCKET/PREFIX with --endpoint in real use): push run-3,"
	@echo "   pull it into an empty store, then reuse it from a fresh copy of the workspace (docs/remote.md)"
	$(STAGESTORE) remote add origin file://$(abspath $(DEMO))/remote -p $(DEMO)/workspace/stagestore.toml
	$(STAGESTORE) push run-3 -p $(DEMO)/workspace/stagestore.toml
	$(STAGESTORE) --store $(DEMO)/other-store remote add origin file://$(abspath $(DEMO))/remote
	$(STAGESTORE) --store $(DEMO)/other-store pull run-3
	$(STAGESTORE) --store $(DEMO)/other-store verify
	@cp -r $(DEMO)/workspace $(DEMO)/laptop && rm -rf $(DEMO)/laptop/.stagestore
	$(STAGESTORE) remote add origin file://$(abspath $(DEMO))/remote -p $(DEMO)/laptop/stagestore.toml
	$(STAGESTORE) run --remote origin --run-id laptop-1 -p $(DEMO)/laptop/stagestore.toml
	$(STAGESTORE) show laptop-1 -p $(DEMO)/laptop/stagestore.toml

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache *.egg-info

docs: venv
	$(PY) -m stagestore.cli.reference > docs/cli.md
	$(PY) -m stagestore.cli.errordoc > docs/errors.md
	$(PY) -m stagestore.cli.apidoc > docs/api.md
