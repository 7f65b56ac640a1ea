# Sourced by the device scripts (bench/*.sh), from the repository root of a source tree (no pip install): the tree on
# PYTHONPATH, kernels/ linked in as minids.kernels (as the install maps it), results into $OUT (then bench/results/).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
[[ -e minids/kernels ]] || ln -s ../kernels minids/kernels
OUT="${OUT:-bench/results}"
