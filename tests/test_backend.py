import os
import subprocess
import sys

import numpy as np
import pytest

from hpcnn import backend


def test_numpy_default_without_gpu():
    b = backend.Backend("numpy")
    assert b.xp is np and not b.is_gpu
    a = b.to_device([1.0, 2.0], dtype=np.float32)
    assert a.dtype == np.float32 and backend.to_host(a).tolist() == [1.0, 2.0]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(backend.BackendError, match="numpy, cupy or auto"):
        backend.Backend("tpu")


def test_forcing_cupy_without_gpu_fails_clearly():
    try:
        import cupy  # noqa: F401
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    code = "from hpcnn.backend import get_backend; get_backend()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HPCNN_BACKEND": "cupy"})
    assert r.returncode != 0
    assert "HPCNN_BACKEND=cupy was requested" in r.stderr


def test_limit_blas_threads():
    from threadpoolctl import threadpool_info
    try:
        assert backend.limit_blas_threads(1) == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    finally:
        backend._blas_limiter.restore_original_limits()
