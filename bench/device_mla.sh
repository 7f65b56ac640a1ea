#!/usr/bin/env bash
# The MLA decoding work's device calls (bash bench/device_mla.sh <step>), results into $OUT (then bench/results/):
#   gluon:  the Gluon path: tests/test_kernels_mla_gluon.py on six processes, then bench/probe_mla_gluon.py
#           (each shape with GLUON_MLA on and off, checked against the reference, graph-timed)
#   bench:  bench/mla_decode.py's full sweep (the default path)
#   narrow2: the two-warpgroup narrow kernel (mla_decode_gluon.NARROW2_ROWS, off): its GPU tests, then the 16-head
#           sweep with it (mla_decode-narrow2.md) beside the default's (mla_decode-h16.md)
#   ab FILE [STEM]: the GPU tests, then bench/ab_mla_gluon.py: this tree's Gluon path against FILE (another revision's
#           kernels/mla_decode_gluon.py), alternating, on the short-cache shapes (mla_decode-ab.md)
#   small FILE...: the GPU tests, bench/ab_mla_gluon.py --cases small against the FILEs (small-v3's shapes), then
#           the full sweep
#   trace:  the GPU tests, bench/trace_mla_gluon.py (each narrow program's timeline on the short and long caches), then
#           the full sweep
#   ncu:    Nsight Compute on the Triton kernel's worst cases (bench/profile_mla_decode.py), and its --floor timings
source bench/device_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
case "${1:-gluon}" in
  gluon)
    bash bench/gpu_tests_split.sh tests/test_kernels_mla_gluon.py gpu_tests_mla_gluon.log
    timeout 240 python3 bench/probe_mla_gluon.py 2>&1 | tee "$OUT/probe_mla_gluon.log" | grep -v "^{"
    ;;
  bench)
    python3 bench/mla_decode.py --out "$OUT" 2>&1 | tail -5
    ;;
  narrow2)
    bash bench/gpu_tests_split.sh tests/test_kernels_mla_gluon.py gpu_tests_mla_gluon.log
    python3 bench/mla_decode.py --out "$OUT" --heads 16 --stem mla_decode-h16 2>&1 | grep "^V3"
    python3 bench/mla_decode.py --out "$OUT" --heads 16 --narrow2 --stem mla_decode-narrow2 2>&1 | grep "^V3"
    ;;
  ab)
    bash bench/gpu_tests_split.sh tests/test_kernels_mla_gluon.py gpu_tests_mla_gluon.log
    python3 bench/ab_mla_gluon.py --base "$2" --out "$OUT" --stem "${3:-mla_decode-ab}" 2>&1 | grep -v "^{"
    ;;
  small)
    bash bench/gpu_tests_split.sh tests/test_kernels_mla_gluon.py gpu_tests_mla_gluon.log
    python3 bench/ab_mla_gluon.py --base "${@:2}" --reps 2 --cases small --out "$OUT" --stem mla_decode-ab-small128 \
      2>&1 | grep -v "^{"
    python3 bench/mla_decode.py --out "$OUT" 2>&1 | tail -3
    ;;
  trace)
    bash bench/gpu_tests_split.sh tests/test_kernels_mla_gluon.py gpu_tests_mla_gluon.log
    timeout 240 python3 bench/trace_mla_gluon.py --out "$OUT" 2>&1 | tee "$OUT/trace_mla_gluon.log"
    python3 bench/mla_decode.py --out "$OUT" 2>&1 | tail -3
    ;;
  ncu)
    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats --section Occupancy \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
      python3 bench/profile_mla_decode.py > "$OUT/ncu_mla.txt" 2>&1
    grep -E "^  _|Duration|DRAM Throughput|Registers Per|Achieved Occ|^B=" "$OUT/ncu_mla.txt"
    (echo "# MINIDS_AUTOTUNE=0"; MINIDS_AUTOTUNE=0 python3 bench/profile_mla_decode.py --floor
     echo "# autotuned"; python3 bench/profile_mla_decode.py --floor) 2>&1 | tee "$OUT/mla_floor.log"
    ;;
esac
