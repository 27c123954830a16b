#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (its python3 holds a CUDA build of torch):
# the hooks engine's float64 tests with every tensor on the GPU, then benchmarks/cuda_check.py.
# Logs and JSON go to $OUT (the device tool's folder), else benchmarks/results.
#   bash benchmarks/cuda_check.sh
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
# every case of the engine's float64 checks, the tensors on the GPU; the patches and correlate
# paths are CPU-only (not offered on the GPU), so their forced-path runs are left out
GRAMNEWTON_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_hooks_engine.py \
    -k "not (test_conv_weight_paths and (patches or correlate))" >"$out/cuda_tests.log" 2>&1
echo "hooks engine tests on cuda: exit $?"
tail -n 25 "$out/cuda_tests.log"
timeout 240 python3 benchmarks/cuda_check.py --out "$out/cuda_check.json" 2>&1 | tee "$out/cuda_check.log"
# users' models on the GPU: autocast, modules without a handler, raw parameters, an encoder
timeout 180 python3 benchmarks/user_models.py --device cuda --engines auto --out "$out/user_models_cuda.json" 2>&1 | tail -n 12
