"""A camera panning and zooming smoothly over a real photograph."""
from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from partime_async.core.frame import Frame

from .base import Source


def sample_photograph() -> Path:
    """A photograph shipped inside an installed package (matplotlib's sample data): no download."""
    from matplotlib import cbook

    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    if not path.exists():
        raise FileNotFoundError(f"matplotlib's sample photograph is missing at {path}; pass image=PATH instead")
    return path


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a float32 (3, H, W) tensor in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class PanZoomCamera(Source):
    """A deterministic smooth camera path over a photograph: the view drifts on a Lissajous
    path and zooms in and out, sampled bilinearly to ``(1, 3, height, width)`` frames.

    Consecutive frames differ a little (a smooth, non-i.i.d. stream, as online learning on
    video meets it), and the same arguments give the same frames.

    Args:
        frames: how many (None: endless).
        height, width: output frame size.
        image: a path to any image file; default: a photograph shipped with matplotlib.
        zoom: (min, max) fraction of the photograph's side that the view covers.
        speed: path speed, about the fraction of a cycle per frame.
        dtype: ``torch.float32`` in [0, 1] or ``torch.uint8``.
        fps: pace to a wall clock (None: as fast as consumed).
        start: the first frame's seq (to resume a stream at a checkpoint's ``state["position"]``;
            it yields frames ``start`` … ``frames - 1``).
    """

    name = "pan-zoom camera"

    def __init__(self, frames: int | None = 256, *, height: int = 64, width: int = 64,
                 image: str | Path | None = None, zoom: tuple[float, float] = (0.35, 0.7),
                 speed: float = 0.004, dtype: torch.dtype = torch.float32, fps: float | None = None,
                 start: int = 0) -> None:
        super().__init__(fps=fps)
        if frames is not None and frames < 0:
            raise ValueError(f"frames must be >= 0 or None, got {frames}")
        if not 0 < zoom[0] <= zoom[1] <= 1:
            raise ValueError(f"zoom must be (min, max) with 0 < min <= max <= 1, got {zoom}")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        self.path = Path(image) if image is not None else sample_photograph()
        self.photo = load_image(self.path).unsqueeze(0)
        self.n_frames = frames
        self.size = (height, width)
        self.zoom = zoom
        self.speed = speed
        self.dtype = dtype
        self.start = start

    def render(self, t: int) -> torch.Tensor:
        """Frame ``t`` (random access)."""
        phase = 2 * math.pi * self.speed * t
        lo, hi = self.zoom
        scale = lo + (hi - lo) * 0.5 * (1 + math.sin(0.7 * phase))
        margin = 1 - scale  # keep the view inside the photograph
        cx = margin * math.sin(phase)
        cy = margin * math.sin(1.3 * phase + 1.0)
        theta = torch.tensor([[[scale, 0.0, cx], [0.0, scale, cy]]], dtype=torch.float32)
        grid = F.affine_grid(theta, [1, 3, *self.size], align_corners=False)
        frame = F.grid_sample(self.photo, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.dtype == torch.uint8:
            return (frame * 255).round_().clamp_(0, 255).to(torch.uint8)
        return frame

    async def frames(self) -> AsyncIterator[Frame]:
        t = self.start
        while self.n_frames is None or t < self.n_frames:
            yield Frame(t, self.render(t))
            t += 1
