"""Sinks: where a graph's outputs go. Each sink is fed by its own bounded channel."""
from .base import CallbackSink, Collect, NullSink, Sink
from .checkpoint import Checkpoint
from .files import AtomicFile, JsonlSink, NpySink, summarize
from .video import VideoSink  # PyAV is imported when a VideoSink is made, not here

__all__ = ["AtomicFile", "CallbackSink", "Checkpoint", "Collect", "JsonlSink", "NpySink", "NullSink", "Sink",
           "VideoSink", "summarize"]
