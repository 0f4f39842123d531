#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels the GPU parity tests need on the lent machine, whose image has
# transformers 5.x (no MEGA) and no network: transformers 4.57.6 (the parity reference) and the versions of
# huggingface_hub and tokenizers it accepts. They land in .whl/ (git-ignored, ~16 MB); name `.whl` in the device
# tool's `carry`, and gpu_check.sh installs them into a private folder used only by its parity step.
# Usage (repo root): bash benchmarks/gpu_wheels.sh
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
ls -la .whl
