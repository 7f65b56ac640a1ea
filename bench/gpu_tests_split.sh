#!/usr/bin/env bash
# One test file on the GPU as six parallel pytest processes (one process runs past the device's call limit on
# tests/test_kernels_fp8.py, mostly compiling): bash bench/gpu_tests_split.sh [test file] [log name] [-k expression]
source bench/device_env.sh
file="${1:-tests/test_kernels_fp8.py}"
log="${OUT:-bench/results}/${2:-gpu_tests_split.log}"
python3 -m pytest --co -q -p no:cacheprovider "$file" ${3:+-k "$3"} 2>/dev/null | grep "::" > /tmp/ids.txt
echo "$(wc -l < /tmp/ids.txt) tests in $file"
if [[ ! -s /tmp/ids.txt ]]; then  # (pytest with no ids would run the whole suite)
  python3 -m pytest --co -q -p no:cacheprovider "$file" ${3:+-k "$3"} 2>&1 | tail -5 | tee "$log"
  exit 1
fi
rm -f /tmp/ids_*
split -n r/6 /tmp/ids.txt /tmp/ids_
for f in /tmp/ids_??; do (timeout 400 python3 -m pytest -q -p no:cacheprovider $(cat "$f") > "$f.log" 2>&1; echo "rc $?" >> "$f.log") & done
wait
for f in /tmp/ids_??.log; do grep -E "passed|failed|^rc |FAILED|Error" "$f" | tail -6; done | tee "$log"
