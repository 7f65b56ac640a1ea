#!/usr/bin/env bash
# One device call: GPU parity tests, then the benchmarks. Results land in $OUT (copied to bench/results/).
source bench/device_env.sh
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
  python3 bench/checkpoint_io.py --out "$OUT" --dir /tmp/minids-ckpt-bench ${DIAGNOSE:+--diagnose} 2>&1 | tee "$OUT/checkpoint_io.log"
fi
if [[ $what == dist ]]; then
  # two processes, one GPU each: DDP, then FSDP2; each stops half way and resumes
  for kind in ${KINDS:-ddp fsdp}; do
    run=/tmp/minids-$kind
    rm -rf $run
    common="--model tiny-v3 --max_steps 24 --eval_interval 12 --ckpt_interval 12 --seq_len 256 --batch_size 8 --sample_tokens 40 --plots false --out_dir $run"
    accelerate launch --config_file scripts/accelerate/$kind.yaml -m minids.cli train $common --stop_after 12 > "$OUT/dist_${kind}_first.log" 2>&1
    grep -v -e "it/s" "$OUT/dist_${kind}_first.log" | grep -E "minids|Error|error|done|stopped" | head -n 12
    accelerate launch --config_file scripts/accelerate/$kind.yaml -m minids.cli train $common --resume > "$OUT/dist_${kind}_resume.log" 2>&1
    grep -v -e "it/s" "$OUT/dist_${kind}_resume.log" | grep -E "minids|Error|error|done|stopped" | head -n 12
    python3 - "$run" <<'PY' | tee "$OUT/dist_$kind.log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r["step"] for r in rows if "loss" in r]
print(sys.argv[1], "steps logged:", len(steps), "unique:", len(set(steps)), "first loss", rows[0]["loss"],
      "last", [r["loss"] for r in rows if "loss" in r][-1], "val", [r["val_loss"] for r in rows if "val_loss" in r],
      "maxvio_global", [r.get("maxvio_global") for r in rows if "val_loss" in r])
PY
    ls $run/checkpoints/*
  done
fi

if [[ $what == ncu ]]; then
  # hardware counters of the FP8 quantization kernels (Nsight Compute; clocks left as they are)
  ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    python3 bench/profile_fp8_quant.py > "$OUT/ncu_quant.txt" 2>&1
  grep -E "^  _|Duration|DRAM Throughput|Registers Per Thread|Achieved Occupancy" "$OUT/ncu_quant.txt"
fi

if [[ $what == sweeps ]]; then
  # each kernel's launch variants with fixed configs, every one checked against the reference (~1.5-2.5 min each);
  # the kernels' defaults come from these tables
  for s in ${SWEEPS:-rmsnorm moe mla fp8_gemm}; do
    echo "== sweep_$s"
    timeout ${BENCH_TIMEOUT:-240} python3 bench/sweep_$s.py --out "$OUT" ${SWEEP_ARGS:-} 2>&1 | grep -v -i -e warn -e "^|" | tail -n ${BENCH_TAIL:-45} | cut -c1-220
  done
fi

if [[ $what == kernels ]]; then
  # the kernel issues in one call: GPU parity tests, then each benchmark (QUICK=1 for the reduced sweeps);
  # every result file goes into one archive (the device tool returns at most 8 files)
  res=/tmp/minids-results; rm -rf $res; mkdir -p $res
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  q=${QUICK:+--quick}
  if [[ -z ${SKIP_TESTS:-} ]]; then
    for t in ${TESTS:-tests/test_kernels_fp8.py tests/test_kernels_mla.py tests/test_kernels_mla_gluon.py tests/test_kernels_rmsnorm.py tests/test_kernels_moe.py tests/test_gpu.py tests/test_gpu_decode.py}; do
      echo "== $t"
      # 300 s: the FP8 file compiles every GEMM variant (it ran past 100 s on the H200)
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --tb=line -rf $t > $res/test.log 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed|Error:|error:|assert" $res/test.log | cut -c1-300 | head -n 25
      cat $res/test.log >> $res/gpu_kernel_tests.log
    done
  fi
  cks=""; [[ -d runs/mtp3m-ckpt ]] && cks="--ckpt runs/mtp3m-ckpt"
  if [[ -n ${TRAIN_MTP:-} ]]; then
    # a deeper trained model for the speculation rows: tiny-v3 with 8 layers (the MTP layer is then 1/8 of the main
    # model, not 1/4), 3M tokens of the standard library with the settings of runs/mtp3m, trained on this GPU
    python3 -m minids.cli train --model tiny-v3 --model_overrides '{"num_hidden_layers": 8}' --max_tokens 3000000 \
      --batch_size 16 --seq_len 256 --lr 0.002 --warmup_steps 30 --mtp_weight 0.3 --mtp_weight_final 0.1 \
      --mtp_switch_fraction 0.676 --bias_gamma 0.001 --bias_gamma_final 0.0 --bias_freeze_fraction 0.966 \
      --eval_interval 150 --ckpt_interval 1000 --plots false --out_dir /tmp/mtp8l > $res/train_mtp8l.log 2>&1
    grep -v "it/s" $res/train_mtp8l.log | tail -n 4; cp /tmp/mtp8l/metrics.jsonl $res/mtp8l_metrics.jsonl
    ck8=$(ls -d /tmp/mtp8l/checkpoints/step-* | tail -n 1); [[ -n $ck8 ]] && cks="$cks --ckpt $ck8"
  fi
  for b in ${BENCHES:-fp8 mla_decode rmsnorm moe decode}; do
    extra=""; [[ $b == decode ]] && extra="$cks ${DECODE_ARGS:-}"; [[ $b == fp8 ]] && extra="${FP8_ARGS:-}"
    [[ $b == moe ]] && extra="${MOE_ARGS:-}"
    timeout ${BENCH_TIMEOUT:-300} python3 bench/$b.py --out $res $q $extra 2>&1 | grep -v -e "Loading weights" > $res/$b.log
    grep -v -e "^|" -e "^ *naive: skipped" -e "^ *ref_fp32: skipped" $res/$b.log | tail -n ${BENCH_TAIL:-40} | cut -c1-200
    tar czf "$OUT/kernels.tgz" -C $res .  # after every benchmark: what finished comes back even if a later one is cut
  done
fi
