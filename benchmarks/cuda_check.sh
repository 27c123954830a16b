#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (its python3 holds a CUDA build of torch):
# the hooks engine's float64 tests with every tensor on the GPU, the numerics tests with cuda as
# torch's default device, then benchmarks/cuda_check.py.
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
# the engine/optimizer numerics tests with cuda as torch's default device (tests/conftest.py):
# every tensor and module they make goes to the GPU; the CPU-only ones skip with their reason
numerics="test_engine_routing test_engine_plumbing test_engine_state_reliability test_momentum
    test_parameter_space_solve test_solve test_solve_numerics test_damping test_damping_numerics test_geodesic
    test_optim test_optim_compat test_metric test_metric_state test_metric_geodesic_numerics test_retries
    test_reliability test_random_models test_classification test_loss_reliability test_handler_options
    test_forward_laplacian test_pinn test_pinn_reliability test_recurrent_reliability test_rows_by_graph
    test_subset_damping test_subsampled_prototype test_theory_reliability"
parallel=()  # 31 s with 8 workers on the H200; pytest-xdist may be missing
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
GRAMNEWTON_TEST_DEFAULT_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs "${parallel[@]}" \
    $(printf 'tests/%s.py ' $numerics) >"$out/cuda_numerics_tests.log" 2>&1
echo "numerics tests with cuda as the default device: exit $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/cuda_numerics_tests.log" | tail -n 40
timeout 240 python3 benchmarks/cuda_check.py --out "$out/cuda_check.json" 2>&1 | tee "$out/cuda_check.log"
# users' models on the GPU: autocast, modules without a handler, raw parameters, an encoder
timeout 180 python3 benchmarks/user_models.py --device cuda --engines auto --out "$out/user_models_cuda.json" 2>&1 | tail -n 12
