"""Measuring a model on the device that may run it: seconds per layer (for ``balance="time"``)
and per stage (for choosing inline stages)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import nn

from ..core.frame import Payload, clone, now


class LayerFailed(RuntimeError):
    """A layer raised while being profiled; the original exception is the ``__cause__``."""

    def __init__(self, index: int, layer: nn.Module) -> None:
        self.index = index
        super().__init__(f"layer {index} ({type(layer).__name__})")


def profile_layers(layers: Sequence[nn.Module], sample: Payload, *, repeats: int = 7, warmup: int = 2) -> list[float]:
    """Median seconds of each layer on ``sample``'s device, run in order (layer i sees layer
    i-1's output). Each pass starts from a copy of ``sample``, which is left as it was (a layer
    may modify its input in place).

    Whole passes are timed layer by layer, ``warmup`` passes discarded, so that a transient
    (a cold cache, another process) spreads over all layers instead of biasing one. Runs
    without autograd; buffers (e.g. BatchNorm statistics) are restored, so profiling leaves
    the model as it found it.
    """
    saved = [{k: b.clone() for k, b in layer.named_buffers()} for layer in layers]
    cuda = any(p.is_cuda for layer in layers for p in layer.parameters())
    samples: list[list[float]] = [[] for _ in layers]
    try:
        with torch.no_grad():
            for rep in range(warmup + repeats):
                x = clone(sample)
                for i, layer in enumerate(layers):
                    t0 = now()
                    try:
                        x = layer(x)
                    except Exception as exc:
                        raise LayerFailed(i, layer) from exc
                    if cuda:
                        torch.cuda.synchronize()
                    if rep >= warmup:
                        samples[i].append(now() - t0)
    finally:
        for layer, buffers in zip(layers, saved, strict=True):
            for name, value in layer.named_buffers():
                value.copy_(buffers[name])
    return [statistics.median(s) for s in samples]


def time_module(module: nn.Module, x: Payload, repeats: int = 5) -> tuple[float, Payload]:
    """Median seconds of ``module`` on ``x`` (buffers restored, ``x`` left as it was), and its output."""
    times = profile_layers([module], x, repeats=repeats)
    with torch.no_grad():
        saved = {k: b.clone() for k, b in module.named_buffers()}
        y = module(clone(x))
        for k, b in module.named_buffers():
            b.copy_(saved[k])
    return times[0], y
