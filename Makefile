# The two commands of the README. Each one sets itself up from nothing.
# PYTHON picks the interpreter, with a venv of its own: `make test` uses .venv
# (python3); `make test PYTHON=python3.12` uses .venv-py3.12. TESTS narrows
# the suite (files or node ids, as pytest takes them).
PYTHON ?= python3
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifeq ($(PYVER),)
$(error PYTHON=$(PYTHON) does not run here; give an interpreter, e.g. make test PYTHON=python3.12 (pyenv: PYTHON=$$(pyenv root)/versions/3.12.1/bin/python3.12))
endif
VENV   ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-py$(PYVER))
PY     := $(VENV)/bin/python
TESTS  ?=
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# loadfile: a file's tests share one worker, so module fixtures (a trained codec, a
# 1-device baseline) are built once.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	# tinysoundfont declares pyaudio (no Linux wheel, playback only); we only render offline.
	$(PY) -m pip install -q --no-deps 'tinysoundfont>=0.3.6'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m musicjax.demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) $(TESTS)

bench: $(STAMP)
	$(VENV)/bin/musicjax bench codec --config configs/codec/base.py
	$(VENV)/bin/musicjax bench codec --config configs/codec/encodec_24khz_size.py --seconds 20
	$(VENV)/bin/musicjax bench lm-decode --config configs/lm/bench_tiny.py
	$(VENV)/bin/musicjax bench lm-train --config configs/lm/bench_tiny.py
	$(VENV)/bin/musicjax bench accomp --config configs/accomp/tiny.py
	$(VENV)/bin/musicjax bench accomp --config configs/accomp/vampnet_tiny_size.py --frames 750,3000 --steps 12,36 --repeats 3
	$(VENV)/bin/musicjax bench decode-attention

clean:
	rm -rf .venv .venv-py* runs .pytest_cache
