"""The runner: one coroutine per stage (or per chain of threaded CPU stages), driving the
stage's program over its transports on its device (or dealing frames to its replicas)."""
from .replicas import Replica
from .runner import OnError, OnFailure, Stage, StageRunner

__all__ = ["OnError", "OnFailure", "Replica", "Stage", "StageRunner"]
