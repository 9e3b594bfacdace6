#!/usr/bin/env bash
# Every GPU check of this project in one call on the lent GPU machine (its device time is short):
# the carried wheels (bench/gpu_wheels.sh, run here first), the card, the gpu-marked tests (bf16 steps
# with each backend), then bench/gpu.py (tokens/s, MFU, peak memory). Everything lands in $OUT.
# Run from the repository root there:  bash bench/gpu_check.sh   (carry: .whl; timeout_s 600: install,
# tests <= 150 s and bench <= 380 s fit, and bench/gpu.py keeps the rows it finished when it is cut off)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 WANDB_MODE=offline
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, deepspeed, streaming; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'deepspeed', deepspeed.__version__, 'streaming', streaming.__version__)"
} 2>&1 | tee "$OUT/card.txt"
timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_trainer.py 2>&1 \
    | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-380}" python3 bench/gpu.py --out "$OUT/gpu_bench.md" 2>&1 | tee "$OUT/gpu_bench.log"
