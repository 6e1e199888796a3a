#!/usr/bin/env bash
# The main job, end to end with blockcore's tools: a raw base image, a qcow2 overlay on it,
# writes through the overlay, its map, a convert to a standalone qcow2, and checks. When
# QEMU's qemu-img is installed it judges the result too.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # relative names: the transcript in README.md reads the same on every machine
run() { echo "\$ $1"; eval "$1"; echo; }

run "blockcore-img create -f raw base.raw 64M"
run "blockcore-io -f raw -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 32M 1M' base.raw"
run "blockcore-img create -f qcow2 -b base.raw -F raw top.qcow2"
run "blockcore-io -f qcow2 -c 'write -P 0xcc 512k 1M' -c 'read -P 0xaa 0 512k' \
-c 'read -P 0xcc 512k 1M' -c 'read -P 0xbb 32M 1M' top.qcow2"
run "blockcore-img map top.qcow2"
run "blockcore-img info top.qcow2"
run "blockcore-img convert -O qcow2 top.qcow2 flat.qcow2"
run "blockcore-img check flat.qcow2"
run "blockcore-img compare top.qcow2 flat.qcow2"
if command -v qemu-img >/dev/null 2>&1; then
    run "qemu-img check flat.qcow2"
    run "qemu-img compare top.qcow2 flat.qcow2"
fi
echo "main job done"
