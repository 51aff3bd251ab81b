# Two commands for a new user: `make run` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vtprune-installed

.PHONY: setup run demo chromium test test-peer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CUDA build of torch that runs on the CPU: the CPU-only wheel has no matching torchvision here.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[all]' 'filelock<4'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/vtprune example --out out/example

demo: $(STAMP)
	$(BIN)/vtprune demo

# The demo's browser test drives Debian's chromium; installed only when missing (CI runs as root on Debian).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

# transformers' own model tests, dense and with a keep-all session of every method (tests/peer/README.md; hours).
# Needs the transformers test files: PEER_SRC=<transformers git checkout> [PEER_REV=<tag or commit>] the first time.
test-peer: $(STAMP)
	$(BIN)/python -m tests.peer.run --out out/peer --jobs 2 $(if $(PEER_SRC),--transformers-src $(PEER_SRC)) $(if $(PEER_REV),--transformers-rev $(PEER_REV))

clean:
	rm -rf $(VENV) out
