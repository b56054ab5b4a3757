#!/usr/bin/env bash
# Study II's arms on one GPU (issue 11): the real ViT-S/14 and the real CIFAR-10 from ../shared at 224 px, bf16,
# nothing from the network, through the experiment engine (`fclora sweep --arms`, one papermill notebook per run),
# then `fclora compare` writes runs.csv and aggregate.csv beside the runs. 15 runs (results/study2-gpu-vits-cifar10/
# arms.json), sized for about 10 minutes on one H200; resumable (rerun to continue; finished runs are skipped).
#   bash benchmarks/gpu_study.sh            # on the GPU machine, from anywhere in the repository
#   bash benchmarks/gpu_study.sh --smoke    # a CPU check of this script: tiny images and subsets, into a temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
FCLORA="${FCLORA:-$(dirname "${PYTHON:-python}")/fclora}"; command -v "$FCLORA" >/dev/null || FCLORA=fclora
ARMS=results/study2-gpu-vits-cifar10/arms.json
OUT=results/study2-gpu-vits-cifar10
EXTRA=()
if [[ "${1:-}" == "--smoke" ]]; then
  OUT=$(mktemp -d)/study2-gpu-smoke
  # a check of the script, not a measurement: bf16 (the arms') even on a CPU that emulates it
  EXTRA=(--allow-emulated-bf16 --device cpu --image-size 28 --train-subset 200 --test-subset 100 --score-batches 2 --epochs 1 --batch-size 16)
fi
[[ -d ../shared/models/vit-small-patch14-imgfocus ]] || { echo "gpu_study.sh: needs ../shared (the ViT-S/14 and CIFAR-10)" >&2; exit 2; }
start=$(date +%s)
"$FCLORA" sweep cifar10 --arms "$ARMS" --out-dir "$OUT" "${EXTRA[@]}"
"$FCLORA" compare "$OUT" --csv "$OUT/runs.csv" --agg-csv "$OUT/aggregate.csv" > /dev/null
echo "gpu_study.sh: $(ls -d "$OUT"/*-seed*/ | wc -l) runs in $OUT, $(( $(date +%s) - start )) s"
