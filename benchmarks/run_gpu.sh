#!/usr/bin/env bash
# The commands behind the GPU figures in docs/performance.md (run from the repository root on the GPU machine).
# Usage: bash benchmarks/run_gpu.sh STAGE...
#   stages: setup kernel bench semi (H100 figures), tests graphs profile syncs compilecheck (profile, CUDA graphs,
#   host syncs, eager vs torch.compile outputs), bisect (which part / setting of torch.compile changes the outputs)
# Wheels for packages the GPU image lacks (datasets, pycocotools, ...) are expected in .whl/ for `setup` and `semi`
# only (see docs/performance.md); the other stages need torch, transformers, timm, scipy and triton alone.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
for stage in "$@"; do
  echo "===== $stage $(date +%T)"
  case $stage in
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
      if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_arrow/*.whl
      fi
      python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import torch, transformers, triton, timm, datasets, pycocotools, accelerate; print(torch.__version__, transformers.__version__, triton.__version__, timm.__version__, datasets.__version__, accelerate.__version__, torch.cuda.get_device_name())"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ;;
    kernel)
      timeout ${KERNEL_TIMEOUT:-120} python3 benchmarks/check_attention_kernel.py --quick --no-sweep 2>&1 | tee "$OUT/kernel.txt" | tail -40
      timeout 60 python3 -m pytest -q -m gpu tests/test_deformable_attention_triton.py 2>&1 | tail -5 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_model.py --device cuda --steps 5 --warmup 2 --output "$OUT/bench_h100.json" 2>&1 | tail -30 ;;
    semi)
      timeout ${SEMI_TIMEOUT:-160} python3 benchmarks/bench_model.py --device cuda --semi --skip_anchor --skip_inference --backends triton,pytorch --steps 5 --warmup 2 --output "$OUT/bench_semi_h100.json" 2>&1 | tail -12 ;;
    tests)  # the CUDA tests of CUDA graphs, compile/no-sync and the Triton kernel
      python3 -c "import torch, transformers, triton, timm; print(torch.__version__, transformers.__version__, triton.__version__, timm.__version__, torch.cuda.get_device_name())"
      timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -15
      timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_deformable_attention_triton.py 2>&1 | tail -5
      timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_compile.py -k "cuda" 2>&1 | tail -40 ;;
    graphs)  # ours (Triton) eager and replayed from CUDA graphs against the anchor, training and inference
      timeout ${GRAPHS_TIMEOUT:-170} python3 benchmarks/bench_model.py --device cuda --backends triton --cuda_graphs --steps 10 --warmup 3 --output "$OUT/bench_graphs.json" 2>&1 | tail -25 ;;
    profile)  # phases of the training step, torch.profiler summaries, inference eager / CUDA graphs / compiled
      timeout ${PROFILE_TIMEOUT:-260} python3 benchmarks/profile_step.py --device cuda --output_dir "$OUT" --compile_mode ${COMPILE_MODE:-reduce-overhead} 2>&1 | grep -v -E "^(STAGE|USDT)" | tail -120 ;;
    syncs)  # every synchronizing operation of one training step and of the eval forward, by line of our code
      timeout ${SYNCS_TIMEOUT:-100} python3 benchmarks/find_host_syncs.py --output "$OUT/host_syncs.json" 2>&1 | tail -40 ;;
    compilecheck)  # eager vs torch.compile (default, reduce-overhead) outputs on one fixed input, 2+2 layers
      timeout ${COMPILECHECK_TIMEOUT:-180} python3 benchmarks/profile_step.py --device cuda --skip phases,profiler --layers 2 --dtypes fp32 --compile_mode default,reduce-overhead --output_dir "$OUT/compile_check" 2>&1 | grep -v -E "^(STAGE|USDT)" | tail -12 ;;
    bisect)  # torch.compile vs eager per attention path, compiler backend, compiled part and inductor layout setting
      timeout ${BISECT_TIMEOUT:-420} python3 benchmarks/compile_bisect.py --device cuda --output "$OUT/compile_bisect.json" 2>&1 | grep -v -E "^(STAGE|USDT)" | tail -12 ;;
  esac
done
