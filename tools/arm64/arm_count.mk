# `make arm-count`: aarch64 instructions per inference, counted under QEMU as a Pi 4 (Cortex-A72) and a Pi 5
# (Cortex-A76), for the standard models (SBCFormer-XS/B and EfficientNet-Lite0; sbcrt's export and the plain
# one; fp32 and int8; Lite0 also with `--target arm64`; sbcrt's export with `--engine ncnn`, which the emulated
# Pi runs with sbcrt's ncnn engine, as `sbcrt classify` would; ARM_COUNT_ARGS=--fp16 adds its --fp16 rows on the
# A76). Writes $(ARM_COUNT_DIR)/arm_count.json and
# arm_count.md (the README's table). Included from the Makefile after tools/arm64/arm64.mk (BIN, setup,
# arm64-userland, arm64-qemu). Counts are cached per model file and CPU (build/arm64/insn_count/results): a
# second run only prints them; ARM_COUNT_ARGS=--fresh counts again; ARM_COUNT_ARGS="--peers ncnn,ncnn-fp16,litert"
# adds ncnn and LiteRT (pinned wheels fetched into build/arm64/peers; LiteRT's converter venv, litert-torch and
# the CPU torch, ~2 GB there too). With the peers and --fp16 (16 exports, 53 counts; userland and peers' wheels
# already fetched): 43 min on 2 busy cores, 21 of them counting, the rest exporting; cached: seconds.

ARM_COUNT_DIR ?= $(BUILD)/arm-count
ARM_COUNT_CPUS ?= cortex-a72 cortex-a76
# Two emulations at once: each is one guest thread (counted with 1 intra-op thread).
ARM_COUNT_JOBS ?= 2
# Extra arguments for benchmarks/arm_count.py, e.g. --fresh (count again, ignoring cached counts).
ARM_COUNT_ARGS ?=

.PHONY: arm-count arm-count-tools

# gcc builds the counting plugin; patch applies any Debian patch to the QEMU header it is built against.
arm-count-tools:
	@command -v gcc >/dev/null && command -v patch >/dev/null || { \
	    echo "installing gcc and patch for the instruction-counting plugin"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev patch >/dev/null; \
	}

# Two counted inferences per model and CPU, after two warm-ups: the check that the counts are stable.
arm-count: arm64-userland arm-count-tools
	$(BIN)/python benchmarks/arm_count.py --standard-matrix $(addprefix --cpu ,$(ARM_COUNT_CPUS)) \
	    --warmup 2 --repeat 2 --jobs $(ARM_COUNT_JOBS) $(ARM_COUNT_ARGS) \
	    --json $(ARM_COUNT_DIR)/arm_count.json --markdown $(ARM_COUNT_DIR)/arm_count.md
	@echo "wrote $(ARM_COUNT_DIR)/arm_count.json and $(ARM_COUNT_DIR)/arm_count.md"

# make test-arm64 runs the counter's CI check (tests/arm64/arm_count_check.py), which builds the plugin.
test-arm64: arm-count-tools
