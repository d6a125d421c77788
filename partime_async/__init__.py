"""partime_async: deep networks over continuous streams, pipelined across devices on asyncio.

    import partime_async as pa
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance="time")
    async with pipe:
        async for out in pipe.stream(source):
            ...
"""
from .channel import Channel, ChannelClosed, EndOfStream
from .devices import CpuDevice, CudaDevice, Device, cpu_devices
from .errors import FrameDropped, FrameError, PipelineClosed, PipelineError
from .frame import Frame
from .graph import Graph, run, run_sync
from .learning import OnlineLearning
from .pipeline import Pipeline, PipelineStats
from .validation import InputSpec, TensorSpec

__all__ = [
    "Channel", "ChannelClosed", "CpuDevice", "CudaDevice", "Device", "EndOfStream", "Frame",
    "FrameDropped", "FrameError", "Graph", "InputSpec", "OnlineLearning", "Pipeline", "PipelineClosed",
    "PipelineError", "PipelineStats", "TensorSpec", "cpu_devices", "run", "run_sync",
]
__version__ = "0.1.0"
