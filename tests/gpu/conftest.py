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


@pytest.fixture
def deterministic_cudnn():
    """cuDNN in deterministic mode without the autotuner, restored afterwards: graph replays
    and eager runs then use the same kernels, so their results can be compared closely."""
    previous = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous
