#!/usr/bin/env bash
# Every GPU check of hpcnn in one short run, for a lent GPU machine whose
# Python has CuPy, PyTorch (CUDA), pytest and h5py but no MPI (carry the
# MPICH, mpi4py and pytest-mpi wheels in .whl/). Run from the repository root:
#     bash tests/gpu/device_checks.sh [LOGDIR]
# It writes logs, JSON results and summary.txt to LOGDIR ($OUT by default).
# 1. every op on CuPy equals NumPy (float64), a ResNet-18 step on CuPy equals NumPy
# 2. distributed training with the CuPy backend equals the sequential trainer
#    at 2 and 4 ranks (one GPU shared), and the CUDA-aware-MPI probe
# 3. hpcnn bench kernels --device cuda: conv layers and a ResNet-18 step against PyTorch CUDA
set -u
LOGS=${1:-${OUT:-/tmp/hpcnn-gpu-logs}}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
S="$LOGS/summary.txt"
step() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  local t0=$(date +%s)
  timeout "$t" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $(( $(date +%s) - t0 )) s: $(grep -E '[0-9]+ (passed|failed)|ratio|error' "$LOGS/$name.log" | tail -2 | tr '\n' ' ')" | tee -a "$S"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null; date -u; } 2>&1 | tee "$S"

step ops_cupy 120 env HPCNN_BACKEND=cupy PYTHONPATH=$PWD $PY -m pytest tests/test_ops_cupy.py -q -o addopts= -p no:cacheprovider
# MPI from the carried wheels
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
      --prefix /tmp/mpi .whl/*.whl >> "$LOGS/mpi_install.log" 2>&1
  V=$($PY -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
  MPIPATH=/tmp/mpi/lib/$V/site-packages
  export PATH=/tmp/mpi/bin:$PATH LD_LIBRARY_PATH=/tmp/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export PYTHONPATH=$PWD${MPIPATH:+:$MPIPATH}
for p in 2 4; do
  step "equivalence_cupy_np$p" 75 env HPCNN_CUDA_AWARE=0 mpiexec -n $p $PY -m pytest -q -rs --with-mpi \
      -p no:cacheprovider -o addopts= tests/mpi/test_equivalence_cupy.py
done
step bench_step_cuda 75 $PY -m hpcnn bench kernels --device cuda --part step --repeats 20 --warmup 5 --json "$LOGS/bench_step_cuda.json"
step bench_conv_cuda 60 $PY -m hpcnn bench kernels --device cuda --part conv --conv-size real --repeats 10 --warmup 3 --json "$LOGS/bench_conv_cuda.json"
step bench_step224_cuda 60 $PY -m hpcnn bench kernels --device cuda --part step --image-size 224 --repeats 10 --warmup 3 --json "$LOGS/bench_step224_cuda.json"
step probe 30 mpiexec -n 2 $PY -c "
from mpi4py import MPI
from hpcnn.backend import Backend, probe_cuda_aware
b = Backend('cupy'); b.select_device(0)
print('rank', MPI.COMM_WORLD.Get_rank(), 'CUDA-aware MPI:', probe_cuda_aware(MPI.COMM_WORLD, b))"
grep -h "CUDA-aware" "$LOGS/probe.log" | tee -a "$S"
echo "done $(date -u)" | tee -a "$S"
