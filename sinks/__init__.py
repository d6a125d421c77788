"""Sinks: where a graph's outputs go. Each sink is fed by its own bounded channel."""
from .base import CallbackSink, Collect, NullSink, Sink
from .checkpoint import Checkpoint
from .files import AtomicFile, JsonlSink, NpySink, summarize

__all__ = ["AtomicFile", "CallbackSink", "Checkpoint", "Collect", "JsonlSink", "NpySink", "NullSink", "Sink",
           "summarize"]
