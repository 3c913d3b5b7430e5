#!/usr/bin/env bash
# One prepared device check: the CUDA tests, then the GPU benchmark. Run from the repo root on the
# GPU machine with the .whl bundle carried (lark, zarr and its needs); results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
[ -n "$SKIP_TESTS" ] || timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k "cuda or float32 or replication_and_step_closure_float64 and transformer" 2>&1 | tee "$OUT/cuda_tests.log"
timeout 300 python3 bench/bench_gpu.py --steps 200 --window 40 --out "$OUT/RESULTS_gpu.md" 2>&1 | tee "$OUT/bench.log"
