#!/usr/bin/env bash
# The FP8 work's device calls (bash bench/device_fp8.sh <step>), results into $OUT (then copied to bench/results/):
#   probe:  the GPU tests of the Gluon paths, the TMA quantization sweep, the Gluon GEMM sweep (M = 128, 4096)
#   gemm:   the linear's routing tests, then bench/fp8.py's quant and gemm sections
#   linear: bench/fp8.py's linear and linear_kernels sections
#   reg:    the register-layout Gluon quantization (kernels/fp8_reg_quant.py): its GPU tests and bench/fp8.py's reg_quant
#   regsweep: bench/sweep_reg_quant.py, the register layouts of that kernel
#   regon:  with that kernel on by default: the quantization and linear GPU tests, tests/test_fp8.py, the layout sweep
#   quant:  bench/fp8.py's quant and reg_quant sections, the register-layout kernel's GPU tests
#   order:  the register-layout kernel's and the linear's GPU tests (six processes), bench/fp8.py's quant and reg_quant
#           sections, then the tile orders of that kernel (bench/sweep_reg_quant.py --orders)
#   train:  scripts/fp8_layer_check.py (sim vs real per FP8 GEMM, fresh and trained model), then scripts/fp8_vs_bf16.py
#           on small-v3: fp8 off / sim / real and off again (--noise-floor), four parallel processes (one tarball)
source bench/device_env.sh
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
  reg)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8.py -k "reg_quant" 2>&1 | tail -12 | tee "$OUT/gpu_tests_reg_quant.log"
    python3 bench/fp8.py --only reg_quant --out "$OUT" 2>&1 | tee "$OUT/fp8_reg_quant.log" | tail -24
    ;;
  regsweep)
    python3 bench/sweep_reg_quant.py --out "$OUT" 2>&1 | tee "$OUT/fp8_reg_quant-sweep.log" | grep -e best -e triton -e failed
    ;;
  regon)
    bash bench/gpu_tests_split.sh tests/test_kernels_fp8.py gpu_tests_reg_on.log "quant or linear or exact_default or scale_of"
    python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py 2>&1 | tail -4 | tee "$OUT/gpu_tests_test_fp8.log"
    python3 bench/sweep_reg_quant.py --out "$OUT" --stem fp8_reg_quant-sweep2 2>&1 | tee "$OUT/fp8_reg_quant-sweep2.log" \
      | grep -e best -e triton -e failed
    ;;
  quant)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8.py -k "reg_quant or scale_of" 2>&1 | tail -4 \
      | tee "$OUT/gpu_tests_reg_quant.log"
    python3 bench/fp8.py --only quant,reg_quant --out "$OUT" 2>&1 | tee "$OUT/fp8_quant.log" | grep -v "^check" | tail -30
    ;;
  order)
    bash bench/gpu_tests_split.sh tests/test_kernels_fp8.py gpu_tests_reg_quant.log "reg_quant or scale_of or linear"
    python3 bench/fp8.py --only quant,reg_quant --out "$OUT" 2>&1 | tee "$OUT/fp8_quant.log" | grep -v "^check" | tail -36
    python3 bench/sweep_reg_quant.py --orders "0,0;1,8;1,16;1,28;1,56;2,8;8,4;8,8" --calls requant,t,both --out "$OUT" \
      --stem fp8_reg_quant-order2 2>&1 | tail -80
    ;;
  train)
    # everything into $O, returned as one tarball (the device returns at most 8 files)
    O=/tmp/fp8_out; R=/tmp/fp8_runs; mkdir -p "$O"
    A=(--model "${MODEL:-small-v3}" --steps "${STEPS:-200}" --batch-size 16 --seq-len 512 --real yes --noise-floor --runs "$R")
    MINIDS_AUTOTUNE=0 python3 scripts/fp8_layer_check.py --model "${MODEL:-small-v3}" --out "$O/layers_init" > "$O/layers_init.log" 2>&1
    tail -n 2 "$O/layers_init.log"
    # off-again: fp8 off a second time, the spread of two bf16 runs with the same seed and data
    for m in off sim real off-again; do
      ( t=$SECONDS; timeout "${TRAIN_S:-420}" python3 scripts/fp8_vs_bf16.py "${A[@]}" --train-only "$m" 2>&1 \
        | tr '\r' '\n' | grep -v -e "it/s" -e "s/it" > "$O/$m.log"
        echo "$m: $((SECONDS - t)) s" >> "$O/$m.log" ) &
    done
    wait
    tail -n 3 "$O"/*.log
    for m in off sim real off-again; do mkdir -p "$O/runs/$m"; cp "$R/$m/"{metrics.jsonl,run_info.json,train_config.json} "$O/runs/$m/"; done
    python3 scripts/fp8_vs_bf16.py "${A[@]}" --report-only --out "$O/h200"
    ck=$(ls -d $R/sim/checkpoints/step-* 2>/dev/null | tail -n 1)
    [[ -n "$ck" ]] && MINIDS_AUTOTUNE=0 python3 scripts/fp8_layer_check.py --checkpoint "$ck" --out "$O/layers_trained" > "$O/layers_trained.log" 2>&1
    tail -n 2 "$O/layers_trained.log"
    tar czf "$OUT/fp8_train.tgz" -C "$O" .
    ;;
esac
