"""A deterministic synthetic video: soft blobs drifting smoothly over a background."""
from __future__ import annotations

import math
from collections.abc import AsyncIterator

import torch

from partime_async.core.frame import Frame

from .base import Source


class SyntheticVideo(Source):
    """Seeded, smooth video: ``blobs`` Gaussian blobs on Lissajous paths, colours fixed.

    Frames are ``(1, channels, height, width)`` tensors (batch of one), float32 in [0, 1] or
    uint8 in [0, 255]. The same arguments always give the same frames, and consecutive frames
    differ little (a smooth, non-i.i.d. stream, as PARTIME's online learning assumes).

    Args:
        frames: how many frames (None: endless).
        height, width, channels: frame size.
        blobs: number of moving blobs.
        speed: path speed; about the fraction of a cycle per frame.
        dtype: ``torch.float32`` or ``torch.uint8``.
        seed: the stream's seed.
        fps: pace to a wall clock (None: as fast as consumed).
    """

    name = "synthetic video"

    def __init__(self, frames: int | None = 256, *, height: int = 64, width: int = 64, channels: int = 3,
                 blobs: int = 4, speed: float = 0.01, dtype: torch.dtype = torch.float32, seed: int = 0,
                 fps: float | None = None) -> None:
        super().__init__(fps=fps)
        if frames is not None and frames < 0:
            raise ValueError(f"frames must be >= 0 or None, got {frames}")
        if min(height, width, channels, blobs) < 1:
            raise ValueError("height, width, channels and blobs must all be >= 1")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        self.n_frames = frames
        self.shape = (1, channels, height, width)
        self.dtype = dtype
        self.speed = speed
        g = torch.Generator().manual_seed(seed)
        self._freq = 0.5 + torch.rand(blobs, 2, generator=g)          # path frequencies (x, y)
        self._phase = 2 * math.pi * torch.rand(blobs, 2, generator=g)
        self._radius = 0.06 + 0.10 * torch.rand(blobs, generator=g)    # blob size, fraction of side
        self._colour = torch.rand(blobs, channels, generator=g)
        self._background = 0.1 + 0.2 * torch.rand(channels, 1, 1, generator=g)
        self._ys = torch.linspace(0, 1, height).view(1, height, 1)
        self._xs = torch.linspace(0, 1, width).view(1, 1, width)

    def render(self, t: int) -> torch.Tensor:
        """Frame ``t`` of the stream, computed directly (random access)."""
        angle = 2 * math.pi * self.speed * t * self._freq + self._phase
        centre = 0.5 + 0.35 * torch.sin(angle)                           # (blobs, 2) in [0.15, 0.85]
        cx, cy = centre[:, 0].view(-1, 1, 1), centre[:, 1].view(-1, 1, 1)
        r2 = (self._radius ** 2).view(-1, 1, 1)
        weight = torch.exp(-((self._xs - cx) ** 2 + (self._ys - cy) ** 2) / (2 * r2))  # (blobs, H, W)
        image = self._background + torch.einsum("bhw,bc->chw", weight, self._colour)
        image = image.clamp_(0, 1).unsqueeze(0)
        if self.dtype == torch.uint8:
            return (image * 255).round_().to(torch.uint8)
        return image

    async def frames(self) -> AsyncIterator[Frame]:
        t = 0
        while self.n_frames is None or t < self.n_frames:
            yield Frame(t, self.render(t))
            t += 1
