#!/usr/bin/env bash
# fclora vs full fine-tuning of a random-init DeiT-B on synthetic CIFAR-shaped data at 224 px, bf16, one GPU,
# no network: scoring (100 batches) + one epoch of 40,000 images + evaluation, extrapolated to the 10-epoch protocol.
# Prints one JSON line per method and a summary line. Options: see `python benchmarks/gpu_paper_run.py --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_paper_run.py "$@"
