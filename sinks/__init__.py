"""Sinks: where a graph's outputs go. Each sink is fed by its own bounded channel."""
from .base import CallbackSink, Collect, NullSink, Sink
from .checkpoint import Checkpoint

__all__ = ["CallbackSink", "Checkpoint", "Collect", "NullSink", "Sink"]
