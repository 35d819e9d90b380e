# Two commands a new user types: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUILD ?= build

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[export,ncnn,mqtt,http,dev]"
	touch $@

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
