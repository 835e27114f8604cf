#!/usr/bin/env bash
# The CuPy-backend equivalence tests at 2, 3 and 4 ranks on a GPU machine,
# and the CUDA-aware-MPI probe.  Run from the repository root:
#     bash tests/mpi/run_gpu_equivalence.sh [LOGDIR]
# If .whl/ holds wheels of mpich, mpi4py and pytest-mpi (for a machine that
# lacks them and cannot reach PyPI), they are installed under /tmp/mpi first.
set -u
LOGS=${1:-${OUT:-/tmp/hpcnn-gpu-logs}}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
      --prefix /tmp/mpi .whl/*.whl || exit 1
  V=$($PY -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
  export PATH=/tmp/mpi/bin:$PATH PYTHONPATH=/tmp/mpi/lib/$V/site-packages
  export LD_LIBRARY_PATH=/tmp/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import cupy, mpi4py, numpy; from mpi4py import MPI; print('cupy', cupy.__version__, 'mpi4py', mpi4py.__version__, 'numpy', numpy.__version__); print(MPI.Get_library_version().splitlines()[0])"
  git log -1 --format='commit %H' 2>/dev/null; } 2>&1 | tee "$LOGS/gpu.txt"
run_cupy() {  # ranks, log name, extra env
  local p=$1 name=$2; shift 2
  env "$@" timeout 170 mpiexec -n "$p" $PY -m pytest -q -s -rs --with-mpi -p no:cacheprovider \
      tests/mpi/test_equivalence_cupy.py > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: ranks $p, rc $rc, $(grep -E '[0-9]+ (passed|failed|skipped)' "$LOGS/$name.log" | tail -1)" | tee -a "$LOGS/summary.txt"
}
# messages staged through host memory (always safe)
for p in 2 3 4; do run_cupy $p "cupy_staged_np$p" HPCNN_CUDA_AWARE=0; done
# the automatic probe of whether MPI accepts device buffers
timeout 60 mpiexec -n 2 $PY -c "
from mpi4py import MPI
from hpcnn.backend import Backend, probe_cuda_aware
b = Backend('cupy'); b.select_device(0)
print('rank', MPI.COMM_WORLD.Get_rank(), 'CUDA-aware MPI:', probe_cuda_aware(MPI.COMM_WORLD, b))
" > "$LOGS/probe.log" 2>&1
rc=$?
echo "probe: rc $rc: $(grep -h 'CUDA-aware' "$LOGS/probe.log" | head -2 | tr '\n' ' ')" | tee -a "$LOGS/summary.txt"
if [ $rc = 0 ]; then run_cupy 2 cupy_auto_np2; run_cupy 4 cupy_auto_np4; fi
