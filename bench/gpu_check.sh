#!/usr/bin/env bash
# GPU check for a lent GPU machine (python + torch + numpy/pandas/pyarrow/scipy/sklearn/pyyaml; no ray,
# optuna, nibabel or nilearn; no network): training throughput of resnet18/alexnet3d with bf16, feature
# extraction, the losses, and two epochs of the real training loop with a resume check. < 5 minutes.
# Writes $OUT/gpu_check.json (or bench/results/gpu_check.json). Extra arguments go to gpu_check.py
# (e.g. --seconds 10, --skip loop, --quick for a CPU smoke test). Then the fast probes on the device
# (bench/probes.py, fast protocol only, CPU and CUDA; the exact protocol's CPU figures are in
# docs/probes.md): $OUT/probes_gpu.json, < 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "python", sys.version.split()[0])'
rc=0
timeout 295 "$PY" bench/gpu_check.py "$@" || rc=$?
timeout 120 "$PY" bench/probes.py --sizes 1000x128,3227x128,3227x512 --exact '' --reference '' --threads 4 \
    --out "${OUT:-bench/results}/probes_gpu.json" || rc=$((rc ? rc : $?))
exit "$rc"
