#!/usr/bin/env bash
# The eleventh session's device calls (bash bench/device_session11.sh <step>): results into $OUT.
#   probe: the GPU tests of the new Gluon paths, the TMA quantization sweep, the Gluon GEMM sweep (M = 128, 4096)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[[ -e minids/kernels ]] || ln -s ../kernels minids/kernels
OUT="${OUT:-bench/results}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
case "${1:-probe}" in
  probe)
    bash bench/gpu_tests_split.sh tests/test_kernels_fp8.py gpu_tests_tma_ws.log "tma or ws or act_quant_both or act_quant_t"
    python3 bench/fp8.py --only tma_quant --out "$OUT" 2>&1 | tee "$OUT/fp8_tma_quant.log" | tail -60
    python3 bench/sweep_fp8_ws.py --m 128,4096 --out "$OUT" --stem fp8_gemm_ws-sweep2 2>&1 | tee "$OUT/fp8_gemm_ws-sweep2.log" | tail -40
    ;;
esac
