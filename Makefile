# `make test` and `make demo` each set up everything on a fresh clone: a virtual environment
# under the repo, the pinned CPU build of torch, and llmkit with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch that lies on this machine's disk; users bring their own (pyproject has a range).
TORCH := torch==2.13.0
# mkdocs-material prints a banner about its successor on every build; the builds here need no advert.
export NO_MKDOCS_2_WARNING := 1

.PHONY: install test test-fast lint docs docs-serve figures demo vae-demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,data,text,bench]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks docs
	$(BIN)/mypy src

# The suite includes the docs: every Python block of docs/ and the README runs, and the site is
# built with `mkdocs build --strict` (tests/docs/).
test: lint
	$(BIN)/pytest -n 2 --durations=15

# The documentation site, built strictly (a warning, a broken link or cross-reference fails) into site/.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

# The site's pictures (docs/assets/*.png) from the examples' outputs, running the examples that
# are missing (about 5 minutes on 2 cores from nothing); commit the PNGs when results change.
figures: $(STAMP)
	$(BIN)/python docs/make_figures.py

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/pytest -n 2 -m "not slow"

# The library's main job: train the English->French number translator on CPU, distil it into a
# student a quarter of its size, quantize it to int4 weights (PTQ and QAT), train it adversarially
# and measure its robustness under attack, and score them all; then evaluate them with intervals
# and a significance test of distillation's gain.
demo: $(STAMP)
	$(BIN)/python examples/distill_translator.py
	$(BIN)/python examples/quantize_translator.py --model outputs/distill_translator/teacher.ckpt
	$(BIN)/python examples/adversarial_translator.py --plain outputs/distill_translator/teacher.ckpt
	$(BIN)/python examples/evaluate_translator.py

# The VAE on the bundled digits, with PNG grids under outputs/vae_digits.
vae-demo: $(STAMP)
	$(BIN)/python examples/vae_digits.py

bench: $(STAMP)
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/seq2seq.py
	$(BIN)/python benchmarks/distillation.py
	$(BIN)/python benchmarks/qat.py
	$(BIN)/python benchmarks/adversarial.py
	$(BIN)/python benchmarks/vae.py
	$(BIN)/python benchmarks/composition.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
