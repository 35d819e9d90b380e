#!/bin/sh
# HEALTHCHECK of the arm64 image (Dockerfile.arm64 copies this to /usr/local/bin/sbcrt-healthcheck).
#
# A long-running `sbcrt watch` is healthy while it keeps classifying frames: it touches $SBCRT_HEARTBEAT
# (default /data/heartbeat) after each one, and the container turns unhealthy when the file is older than
# $SBCRT_HEALTHY_WITHIN seconds (default 60): a lost camera, a stalled pipeline or a hung inference all stop it.
# Before the first frame (or for one-shot commands, which never write it) the check is that the runtime can
# start at all: Python imports onnxruntime and OpenCV (a broken image or an illegal instruction fails here).
set -eu

heartbeat="${SBCRT_HEARTBEAT:-/data/heartbeat}"
within="${SBCRT_HEALTHY_WITHIN:-60}"

if [ -e "$heartbeat" ]; then
    age=$(($(date +%s) - $(stat -c %Y "$heartbeat")))
    if [ "$age" -gt "$within" ]; then
        echo "unhealthy: last frame ${age} s ago (limit ${within} s, $heartbeat)"
        exit 1
    fi
    echo "healthy: last frame ${age} s ago"
    exit 0
fi
# python3.11 by name: the image installs Debian's python3.11 package only, and nothing there provides
# /usr/bin/python3 (a bare `python3` made every container unhealthy until its first frame).
python3.11 -c "import onnxruntime, cv2, sbcrt" && echo "healthy: runtime loads (no heartbeat yet)"
