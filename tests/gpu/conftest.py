import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def cuda_devices():
    """Two stages on the first GPU (separate streams), or on two GPUs when there are two."""
    import partime_async as pa

    n = torch.cuda.device_count()
    return lambda: [pa.CudaDevice(0), pa.CudaDevice(1 if n > 1 else 0)]
