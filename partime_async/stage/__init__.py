"""The runner: one coroutine per stage (or per chain of threaded CPU stages), driving the
stage's program over its transports on its device."""
from .runner import OnError, OnFailure, Stage, StageRunner

__all__ = ["OnError", "OnFailure", "Stage", "StageRunner"]
