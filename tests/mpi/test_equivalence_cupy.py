"""The equivalence tests on the CuPy backend (GPU).  Skips cleanly where
CuPy or a GPU is missing.  Every plan of this world size trains three SGD
steps on the GPU and is compared with the sequential trainer on NumPy;
messages go through host memory or straight from device buffers, as the
CUDA-aware probe (or HPCNN_CUDA_AWARE) decides."""
import pytest

from hpcnn.backend import Backend, BackendError

from equivalence import check_and_agree
from mpi_helpers import WORLD
from plan_cases import cases

pytestmark = [pytest.mark.mpi, pytest.mark.gpu]


def _cupy_backend():
    try:
        return Backend("cupy"), None
    except BackendError as exc:
        return None, str(exc)


_local = _cupy_backend()
# every rank must take the same decision (no rank may wait for a skipped one)
_everyone = WORLD.allgather(_local[0] is not None)
BACKEND = _local[0] if all(_everyone) else None
REASON = _local[1] or "CuPy is unavailable on some rank"
CASES = cases(WORLD.Get_size())


@pytest.mark.skipif(BACKEND is None, reason=f"no GPU backend: {REASON}")
@pytest.mark.parametrize("name,model,build,opt,covers", CASES, ids=[c[0] for c in CASES])
def test_plan_equals_sequential_on_gpu(name, model, build, opt, covers):
    if WORLD.Get_rank() == 0:
        print(f"\n{name} on {BACKEND.device_name()}, CUDA-aware MPI: {BACKEND.cuda_aware}")
    check_and_agree(name, model, build, opt, BACKEND)
