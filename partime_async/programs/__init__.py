"""Programs: what a stage does with one frame (``base.py`` states the contract the runner keeps).

``infer.py`` (the stage's layers under no-grad), ``learn.py`` (forward, the owed backward and
the optimiser step), ``online.py`` (:class:`OnlineLearning`, the modes and their schedule).
"""
from .base import StageProgram, calls, host_timing, output_checker
from .infer import InferProgram
from .learn import LearnProgram
from .online import MODES, OnlineLearning, StageLearner

__all__ = ["MODES", "InferProgram", "LearnProgram", "OnlineLearning", "StageLearner", "StageProgram",
           "calls", "host_timing", "output_checker"]
