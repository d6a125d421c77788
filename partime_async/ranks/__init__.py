"""Stages in other processes and on other hosts: ``torch.distributed`` point-to-point, ``torchrun``.

``placement.py`` (what ``"rank1:cpu"`` means on each rank; joining the job), ``wire.py`` (a
message: head, layout when it changes, payload bytes), ``link.py`` (one peer: sends posted
without waiting, receives posted ahead, batches, the end of a link, errors that cross it), ``device.py`` (the driving
rank's stand-in for a stage on another rank), ``serve.py`` (a serving rank running the driving
rank's requests).
"""
from .placement import DRIVING_RANK, init, one_stage_per_rank, rank, world_size

__all__ = ["DRIVING_RANK", "init", "one_stage_per_rank", "rank", "world_size"]
