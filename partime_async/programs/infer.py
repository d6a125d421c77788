"""Inference: the stage's layers on each frame, without autograd, timed and checked."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..core.frame import Payload, now
from ..core.stats import StageStats
from ..partition import StagePlan
from .base import StageProgram, calls, host_timing, output_checker


class InferProgram(StageProgram):
    """The stage's module on each frame under no-grad; its output checked against its first
    (``check_outputs``); its busy time in ``stats`` and, with ``spans`` (metrics on), one
    ``compute`` span per frame, where the host clock times the device's work (elsewhere the
    device records both itself). On a device that replays graphs, the stage runs as one."""

    def __init__(self, plan: StagePlan, stats: StageStats, *, spans: deque[Any] | None, check_outputs: bool) -> None:
        super().__init__(plan)
        device = plan.device
        layers = calls(plan.module)
        timed, record = host_timing(plan, stats, spans)
        check = output_checker(plan.name) if check_outputs else None
        index = plan.index
        grad_enabled, set_grad_enabled = torch.is_grad_enabled, torch._C._set_grad_enabled

        def run(x: Payload) -> Payload:
            for layer in layers:
                x = layer(x)
            return x

        graphed: Callable[[Payload], Payload] | None = device.graph_inference(run, name=plan.name)
        graphed = None if graphed is run else graphed

        # Grad mode is toggled with the primitive that ``torch.no_grad`` wraps (a context
        # manager costs microseconds per frame, which is most of a cheap hop). Grad mode is
        # thread-local, so the previous mode is restored before returning. The span (metrics
        # on) reuses the two clock reads that feed the busy time.
        def forward(x: Payload, seq: int) -> Payload:
            t0 = now()
            previous = grad_enabled()
            set_grad_enabled(False)
            try:
                if graphed is not None:
                    x = graphed(x)
                else:
                    for layer in layers:
                        x = layer(x)
            finally:
                set_grad_enabled(previous)
            t1 = now()
            timed.busy_s += t1 - t0
            if record is not None:
                record((index, "compute", seq, t0, t1))
            if check is not None:
                check(x, seq)
            return x

        self.forward = forward
