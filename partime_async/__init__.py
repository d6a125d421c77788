"""partime_async: deep networks over continuous streams, pipelined across devices on asyncio.

    import partime_async as pa
    pipe = pa.Pipeline(model, devices=pa.cpu_devices(2), balance="time")
    async with pipe:
        async for out in pipe.stream(source):
            ...

The packages, in the order they import each other (docs/ARCHITECTURE.md): ``core`` (frames,
errors, checks, counters), ``aio`` (channels, threads and the loop), ``devices`` (where a
stage runs), ``partition`` (what each stage holds), ``transport`` and ``programs`` (how jobs
move; what a stage computes), ``stage`` (the runner), ``pipeline`` (the facade), ``graph``
(source >> pipeline >> sinks), and ``observe`` (spans, reports, traces), read by the pipeline.
"""
from . import ranks
from .aio.channel import Channel, ChannelClosed, EndOfStream
from .core.errors import FrameDropped, FrameError, PipelineClosed, PipelineError
from .core.frame import Frame
from .core.stats import PipelineStats
from .core.validation import InputSpec, TensorSpec
from .devices import CpuDevice, CudaDevice, Device, cpu_devices
from .graph import Graph, run, run_sync
from .pipeline import Pipeline
from .programs import OnlineLearning

__all__ = [
    "Channel", "ChannelClosed", "CpuDevice", "CudaDevice", "Device", "EndOfStream", "Frame",
    "FrameDropped", "FrameError", "Graph", "InputSpec", "OnlineLearning", "Pipeline", "PipelineClosed",
    "PipelineError", "PipelineStats", "TensorSpec", "cpu_devices", "ranks", "run", "run_sync",
]
__version__ = "0.1.0"
