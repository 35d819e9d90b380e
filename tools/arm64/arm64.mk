# `make test-arm64`: the runtime on a Raspberry Pi's own software (Debian bookworm arm64, Python 3.11, the
# aarch64 wheels of the lock, tools/arm64/requirements-test.lock), emulated by QEMU user mode as a Pi 4 (Cortex-A72) and a Pi 5
# (Cortex-A76). Included from the Makefile, which defines BIN and `setup`. See README.md, "Testing the arm64
# runtime without a Pi: `make test-arm64`".
# Cold (fresh clone, nothing cached): ~6 min; warm (userland and exported models cached in build/arm64): ~4 min.

ARM64_CPUS ?= cortex-a72 cortex-a76
# The runtime's own tests that run unchanged on arm64. Left out: test_runtime_cli.py and the subprocess tests in
# test_runtime_classifier.py start `sys.executable` as a child, which needs binfmt (not registered here, and
# not needed on a Pi); test_runtime_lite0.py and test_train.py's lite0 tests export with torch (arm64_parity.py
# covers Lite0 instead). `sbcrt train` itself runs here: it must train on a Pi.
ARM64_RUNTIME_TESTS ?= tests/test_runtime_images.py tests/test_runtime_classifier.py tests/test_train.py
ARM64_RUNTIME_PYTEST_ARGS ?= -k "not never_loads_torch_or_onnx and not telemetry and not lite0"

.PHONY: test-arm64 arm64-userland arm64-qemu

# Debian's dynamically linked qemu-user (not -static): it also loads TCG plugins, for instruction counting.
# --no-install-recommends skips qemu-user-binfmt: nothing here needs the kernel to run aarch64 binaries itself.
arm64-qemu:
	@command -v qemu-aarch64 >/dev/null || { \
	    echo "installing qemu-user (Debian) for the arm64 emulation"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user >/dev/null; \
	}

arm64-userland: setup arm64-qemu
	PIP=$(BIN)/pip tools/arm64/build_userland.sh --with-tests

test-arm64: arm64-userland
	@for cpu in $(ARM64_CPUS); do \
	    echo "== runtime tests on emulated $$cpu"; \
	    tools/arm64/run.sh --cpu $$cpu -- python3 -m pytest -q -p no:cacheprovider \
	        $(ARM64_RUNTIME_TESTS) $(ARM64_RUNTIME_PYTEST_ARGS) || exit 1; \
	done
	@echo "== exported models, x86-64 vs emulated arm64"
	$(BIN)/pytest -q -p no:cacheprovider tests/arm64/arm64_parity.py  # prints build/arm64/report.md
	$(BIN)/pytest -q -p no:cacheprovider tests/arm64/arm_count_check.py  # instruction counter (make arm-count)
