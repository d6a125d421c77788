"""Frame sources: anything that yields :class:`~partime_async.Frame` objects asynchronously.

A pipeline accepts any iterable or async iterable of frames or payloads; the classes here add
names (used in error messages), seeds, pacing and ``>>`` composition.
"""
from .base import Source, from_async_iterable, from_iterable, iterate_frames
from .camera import PanZoomCamera, load_image, sample_photograph
from .files import NpyDirectory, NpzVideo
from .queues import END, QueueSource, from_queue
from .realtime import RealTime
from .sensor import SensorSource
from .synthetic import SyntheticVideo
from .targets import NextFrameTargets, next_frame_targets
from .video import VideoInfo, VideoSource  # PyAV is imported when a VideoSource is made, not here

__all__ = ["END", "NextFrameTargets", "NpyDirectory", "NpzVideo", "PanZoomCamera", "QueueSource", "RealTime",
           "SensorSource", "Source", "SyntheticVideo", "VideoInfo", "VideoSource", "from_async_iterable",
           "from_iterable", "from_queue", "iterate_frames", "load_image", "next_frame_targets", "sample_photograph"]
