export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; [[ -e minids/kernels ]] || ln -s ../kernels minids/kernels
python3 -m pytest --co -q -p no:cacheprovider tests/test_kernels_fp8.py 2>/dev/null | grep "::" > /tmp/ids.txt
wc -l < /tmp/ids.txt
split -n r/6 /tmp/ids.txt /tmp/ids_
for f in /tmp/ids_*; do (timeout 400 python3 -m pytest -q -p no:cacheprovider $(cat $f) > $f.log 2>&1; echo "rc $?" >> $f.log) & done
wait
for f in /tmp/ids_*.log; do grep -E "passed|failed|rc |FAILED|Error" $f | tail -4; done | tee $OUT/gpu_tests_fp8_ws.log
