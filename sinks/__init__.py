"""Sinks: where a graph's outputs go. Each sink is fed by its own bounded channel."""
from .base import CallbackSink, Collect, NullSink, Sink

__all__ = ["CallbackSink", "Collect", "NullSink", "Sink"]
