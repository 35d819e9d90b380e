# Two commands a new user types: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUILD ?= build

# This machine kind's pip configuration names local index folders that hold only some projects; for every other
# one pip prints "Location ... is ignored: it is neither a file nor a directory". Only those lines are dropped.
PIP_QUIET := grep -v "is ignored: it is neither a file nor a directory" >&2 || true

.PHONY: setup test lint demo clean lock

setup: $(VENV)/.installed

# The venv is exactly requirements.lock (every package, pip and the build backend included, hash-checked), then
# sbcrt itself, editable, built by the locked setuptools. Made anew when the lock changes, so nothing outlives it.
# setuptools' "Editable installation" notice (10 lines on every install, about folders named like the package in
# the working directory) is silenced; its other warnings still show (tests/test_packaging.py keeps them at none).
$(VENV)/.installed: requirements.lock setup.cfg pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	bash -o pipefail -c '$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements.lock 2>&1 | { $(PIP_QUIET); }'
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Compile the lock files from setup.cfg and constraints.in (tools/lock.py, with the locked uv). Keeps every
# version the inputs still allow; UPGRADE=1 takes the newest of everything, UPGRADE=NAME of one package.
lock: setup
	$(BIN)/python tools/lock.py $(if $(filter 1,$(UPGRADE)),--upgrade,$(if $(UPGRADE),--upgrade-package $(UPGRADE)))

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

demo: setup
	$(BIN)/sbcrt export efficientnet_lite0 -o $(BUILD)/efficientnet_lite0.onnx
	$(BIN)/sbcrt classify --model $(BUILD)/efficientnet_lite0.onnx sbcrt/data/samples/chelsea.png sbcrt/data/samples/coffee.png

clean:
	rm -rf $(BUILD) $(VENV) *.egg-info

# `make test-arm64`: the runtime on the Pi's own software (Debian arm64 + the pinned aarch64 wheels) under QEMU.
include tools/arm64/arm64.mk
# `make arm-count`: aarch64 instructions per inference under QEMU (Pi 4 / Pi 5 CPU models), not part of CI.
include tools/arm64/arm_count.mk
# `make image-arm64` / `make test-image-arm64`: the arm64 image built with podman and run under QEMU.
include tools/image/image.mk
