#!/usr/bin/env bash
# Study III's arms at 224 px on one GPU (issue 22), from the packs `benchmarks/gpu_study3_prepare.py` wrote into .gpu/
# (the device machine has no ../shared and no network): `python3 benchmarks/gpu_study3.py run`, its log also in
# $OUT/gpu_study3.log. Options: see `python3 benchmarks/gpu_study3.py --help` (--budget-s, default 540).
#   bash benchmarks/gpu_study3.sh                  # on the GPU machine, once every pack has arrived (benchmarks/README.md)
#   bash benchmarks/gpu_study3.sh --smoke          # a CPU check of the script: 28 px, a few images, 1 epoch
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-.gpu/out}"
mkdir -p "$OUTDIR"
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_study3.py run --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_study3.log"
