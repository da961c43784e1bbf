# vicl_fast: `make demo`, `make test`, `make bench` work on a fresh machine.
PY ?= python3
export PY
STAMP := .make/installed
BUILD_INPUTS := setup.py pyproject.toml requirements.txt tools/install.sh \
  $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	bash tools/install.sh
	@mkdir -p .make && touch $@

demo: install
	$(PY) -m vicl_fast.main_job

test: install
	$(PY) -m pytest tests -q

test-all: install  ## slow and GPU tests too
	VICL_FAST_RUNSLOW=1 $(PY) -m pytest tests -q

bench: install
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build .make *.egg-info vicl_fast/*.so
