#!/usr/bin/env bash
# One device call: GPU parity tests, then the benchmarks. Results land in $OUT (copied to bench/results/).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
what="${1:-all}"
if [[ $what == all || $what == tests ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 25 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == all || $what == train ]]; then
  python3 bench/train_throughput.py --device cuda --out "$OUT" ${PROFILE:+--profile} 2>&1 | grep -v -e "Loading weights" -e "Writing model" | tee "$OUT/train_throughput.log"
fi
if [[ $what == all || $what == ckpt ]]; then
  python3 bench/checkpoint_io.py --out "$OUT" --dir /tmp/minids-ckpt-bench 2>&1 | tee "$OUT/checkpoint_io.log"
fi
