"""The vocabulary every other package speaks: frames and payloads, errors, input checks,
statistics. Imports nothing else of ours."""
from .errors import FrameDropped, FrameError, PipelineClosed, PipelineError
from .frame import Frame, Payload, now
from .job import NO_GRADIENT, Job
from .stats import PipelineStats, StageStats
from .validation import InputSpec, TensorSpec

__all__ = ["NO_GRADIENT", "Frame", "FrameDropped", "FrameError", "InputSpec", "Job", "Payload", "PipelineClosed",
           "PipelineError", "PipelineStats", "StageStats", "TensorSpec", "now"]
