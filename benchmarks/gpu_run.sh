#!/usr/bin/env bash
# The whole GPU lease in one call: WRN-28-4 on CIFAR-10, the full evaluation, the GPU benchmarks and the
# service on CUDA, stopping itself within 11.5 minutes (benchmarks/gpu_run.py says what each step does).
#
# Once, on a machine with the data and a package index (the GPU machine has neither):
#   python -m benchmarks.gpu_carry pack --data-dir ../shared/data/cifar10 --to .carry/cifar10
#   python -m benchmarks.gpu_carry wheels --to .carry/wheels
#   echo /.carry/ >> .git/info/exclude
# Then on the GPU machine, from the repository root, with .carry carried along:
#   bash benchmarks/gpu_run.sh                 # figures to $OUT
# Extra arguments go to benchmarks/gpu_run.py (e.g. --budget-s 600). DATA_DIR, when set, names a folder
# that already holds cifar10_{train,test}.npz, and .carry/cifar10 is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if compgen -G ".carry/wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
data=${DATA_DIR:-/tmp/cifar10}
if [ -z "${DATA_DIR:-}" ]; then
  "$python" -m benchmarks.gpu_carry unpack --from .carry/cifar10 --to "$data"
fi
exec "$python" -m benchmarks.gpu_run --data-dir "$data" --out "${OUT:-gpu-run}" "$@"
