#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with a CUDA device (run from the checkout, after the README's setup):
#  1. the benchmark's GPU mode: ResNet50 / VGG11_BN / DenseNet121 at batches 16, 64, 256, eager and compiled,
#     time and peak memory (torch.cuda.max_memory_allocated), plus ViT-B/16 and Swin-T under gate=semantic;
#  2. the paper's figure job (experiment=all_figures, Figs 1-4 and the temperature sweep, ResNet50, random
#     weights on the sample photos: no download) on the GPU with its wall time;
#  3. the same job under trainer=ddp when more than one GPU is visible.
# Output: gpu_check/ (benchmark.md, figures/, timing lines). Usage: scripts/gpu_check.sh [photos folder]
set -euo pipefail
PHOTOS=${1:-../shared/data/imagenette-samples}
OUT=gpu_check
mkdir -p "$OUT"
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY benchmarks/pullback.py --device cuda --repeats 5 --no-floor --json "$OUT/benchmark.json" | tee "$OUT/benchmark.md"
$PY benchmarks/pullback.py --device cuda --archs vit_b_16 swin_t --methods vanilla semantic semantic-noattn \
    --batch 16 64 --repeats 5 --no-floor --no-memory | tee -a "$OUT/benchmark.md"
start=$(date +%s)
.venv/bin/pullbacks experiment=all_figures model.weights=null data=folder data.root="$PHOTOS" trainer=gpu \
    logger=csv output_dir="$OUT/figures" skip_complete=false | tee "$OUT/figures.log"
echo "all_figures on one GPU: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/timing.txt"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then
    start=$(date +%s)
    .venv/bin/pullbacks experiment=all_figures model.weights=null data=folder data.root="$PHOTOS" trainer=ddp \
        logger=csv output_dir="$OUT/figures_ddp" skip_complete=false | tee "$OUT/figures_ddp.log"
    echo "all_figures under ddp: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/timing.txt"
fi
