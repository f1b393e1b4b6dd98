#!/usr/bin/env bash
# Issue 15 §6: what needs a CUDA GPU, as one run on the device machine of a session that is lent one.
#
# That machine's python3 has torch, torchvision, typer, rich, scikit-learn, matplotlib and pytest, but
# not torch-pruning: it travels as a wheel. Prepare here, once per checkout:
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl "torch-pruning==$(.venv/bin/pip show torch-pruning | awk '/^Version/{print $2}')"
# Run there (the device tool's run, carry [".whl"], timeout_s 600): bash bench/gpu.sh
# Profiles save their rows after every batch, so a run cut short resumes where it stopped when run
# again; the steps go in order of worth and each has its own time limit, so the whole stays inside
# one 10-minute call. What it writes goes to $OUT (the device tool brings it back; at most 8 files):
# the CUDA profiles, to be copied into hardware_profiles/ with their results under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SPARSESEARCH_PROFILES=$OUT
log=$OUT/gpu.log
step() {  # step SECONDS COMMAND...: run it with a time limit, log it, go on whatever it returns
    local limit=$1; shift
    echo "== $(date -u +%T) $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tail -n 25 | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} | tee "$log"

# The 2:4 semi-structured kernels and the CUDA code paths the CPU test run skips.
step 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_sparsity.py -k "cuda or semi or nm"
# CUDA profiles at batch 32: float16 first (what a GPU user deploys), then float32.
for dtype in float16 float32; do
    step 130 python3 -m sparsesearch profile --device cuda --model resnet56 --dataset fashion-mnist --batch-size 32 --dtype "$dtype"
    step 50 python3 -m sparsesearch profile validate --device cuda --model resnet56 --dataset fashion-mnist --batch-size 32 \
        --dtype "$dtype" --samples 30 --out "$OUT/validate-resnet56-$dtype.png"
done
step 60 python3 -m sparsesearch profile --device cuda --model tv:resnet18 --batch-size 32 --dtype float16
ls -la "$OUT" | tee -a "$log"
