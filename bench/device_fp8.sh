#!/usr/bin/env bash
# The FP8 work's device calls (bash bench/device_fp8.sh <step>), results into $OUT (then copied to bench/results/):
#   probe:  the GPU tests of the Gluon paths, the TMA quantization sweep, the Gluon GEMM sweep (M = 128, 4096)
#   gemm:   the linear's routing tests, then bench/fp8.py's quant and gemm sections
#   linear: bench/fp8.py's linear and linear_kernels sections
#   train:  scripts/fp8_vs_bf16.py on small-v3, fp8 off / sim / real trained in three parallel processes
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
  gemm)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8.py -k "linear or tma_quant_takes" 2>&1 | tail -8 | tee "$OUT/gpu_tests_linear.log"
    python3 bench/fp8.py --only quant,gemm --out "$OUT" 2>&1 | tee "$OUT/fp8_gemm.log" | grep -v "^check" | tail -60
    ;;
  linear)
    python3 bench/fp8.py --only linear,linear_kernels --out "$OUT" 2>&1 | tee "$OUT/fp8_linear.log" | grep -v "^check" | tail -60
    ;;
  train)
    R=/tmp/fp8_runs; A=(--model small-v3 --steps "${STEPS:-200}" --batch-size 16 --seq-len 512 --runs "$R" --real yes)
    for m in off sim real; do
      ( t=$SECONDS; timeout "${TRAIN_S:-480}" python3 scripts/fp8_vs_bf16.py "${A[@]}" --train-only $m 2>&1 \
        | tr '\r' '\n' | grep -v -e "it/s" -e "s/it" > "$OUT/fp8_vs_bf16_$m.log"
        echo "$m: $((SECONDS - t)) s" >> "$OUT/fp8_vs_bf16_$m.log" ) &
    done
    wait
    tail -n 4 "$OUT"/fp8_vs_bf16_*.log
    for m in off sim real; do mkdir -p "$OUT/runs/$m"; cp "$R/$m/"{metrics.jsonl,run_info.json,train_config.json} "$OUT/runs/$m/"; done
    python3 scripts/fp8_vs_bf16.py "${A[@]}" --report-only --out "$OUT/h200"
    ;;
esac
