# `make image-arm64`: the arm64 image from Dockerfile.arm64, built with podman (no Docker daemon, no registry)
# into build/image/sbcrt-arm64.docker.tar for `docker load` on a Pi. `make test-image-arm64`: that image run
# under QEMU as a Pi 4 (Cortex-A72) and a Pi 5 (Cortex-A76). Included from the Makefile (BIN, setup).
# Both need root (podman's storage, binfmt_misc). Timings: see the README's "Run on a Raspberry Pi in Docker".

.PHONY: image-host image-arm64 test-image-arm64

# Debian's podman, buildah, mmdebstrap, qemu-user-static; containers.conf; binfmt_misc with qemu-aarch64.
image-host:
	tools/image/host_setup.sh

image-arm64: image-host
	tools/image/build.sh

test-image-arm64: setup image-arm64
	$(BIN)/pytest -q -p no:cacheprovider tools/image/test_image.py
