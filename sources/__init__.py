"""Frame sources: anything that yields :class:`~partime_async.Frame` objects asynchronously.

A pipeline accepts any iterable or async iterable of frames or payloads; the classes here add
names (used in error messages), seeds, pacing and ``>>`` composition.
"""
from .base import Source, from_async_iterable, from_iterable
from .synthetic import SyntheticVideo
from .targets import NextFrameTargets, next_frame_targets

__all__ = ["NextFrameTargets", "Source", "SyntheticVideo", "from_async_iterable", "from_iterable",
           "next_frame_targets"]
