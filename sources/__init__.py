"""Frame sources: anything that yields :class:`~partime_async.Frame` objects asynchronously.

A pipeline accepts any iterable or async iterable of frames or payloads; the classes here add
names (used in error messages), seeds, pacing and ``>>`` composition.
"""
from .base import Source, from_async_iterable, from_iterable
from .camera import PanZoomCamera, load_image, sample_photograph
from .synthetic import SyntheticVideo
from .targets import NextFrameTargets, next_frame_targets

__all__ = ["NextFrameTargets", "PanZoomCamera", "Source", "SyntheticVideo", "from_async_iterable", "from_iterable",
           "load_image", "next_frame_targets", "sample_photograph"]
