"""Programs: what a stage does with one frame (``base.py`` states the contract the runner keeps).

``infer.py`` (the stage's layers under no-grad), ``learn.py`` (forward, the owed backward and
the optimiser step), ``online.py`` (:class:`OnlineLearning`, the modes and their schedule),
``depth.py`` (a stage's layers solved in parallel in depth, DeepPCR or Jacobi), ``width.py`` (a
width-split stage: a RePurpose plan's K blocks on K worker threads).
"""
from .base import StageProgram, calls, host_timing, output_checker
from .depth import DEFAULT_TOL, DepthLearnProgram, DepthProgram, DepthStack
from .infer import InferProgram
from .learn import LearnProgram
from .online import MODES, OnlineLearning, StageLearner
from .width import WidthProgram

__all__ = ["DEFAULT_TOL", "MODES", "DepthLearnProgram", "DepthProgram", "DepthStack", "InferProgram", "LearnProgram",
           "OnlineLearning", "StageLearner", "StageProgram", "WidthProgram", "calls", "host_timing", "output_checker"]
