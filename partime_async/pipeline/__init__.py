"""The pipeline: a thin facade (``facade.py``) over parts with one reason to change each:

``run.py`` (one run: its task group, routes, counters; devices started and closed),
``admission.py`` (the door: checks, counts, job keys, checkpoint cuts, the ingress),
``build.py`` (plans, programs, transports and runners, from the first frame),
``delivery.py`` (the egress: each finished frame to its route), ``streams.py`` (sources in,
outputs read back), ``routes.py`` (where each frame's output goes), ``state.py`` (what
outlives a run and is saved), ``cuts.py`` (consistent checkpoint cuts while frames flow),
``config.py`` (argument checks).
"""
from ..core.stats import PipelineStats
from .facade import Pipeline
from .streams import OutputStream

__all__ = ["OutputStream", "Pipeline", "PipelineStats"]
