"""Device lists: what ``devices=`` may say, turned into started-later :class:`Device` objects."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from .base import Device, InlineMode
from .cpu import CpuDevice
from .cuda import CudaDevice


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity and cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_devices(n: int | None = None, *, threads: int | None = None, inline: InlineMode = "auto") -> list[CpuDevice]:
    """``n`` CPU devices (default: one per available core), each with its own worker thread.

    ``threads`` is the intra-op thread count of each; by default the cores are shared out
    evenly, at least one each.
    """
    cores = available_cores()
    n = cores if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cpu_devices needs n >= 1, got {n!r}")
    threads = threads if threads is not None else max(1, cores // n)
    return [CpuDevice(i, threads=threads, inline=inline) for i in range(n)]


def as_device(spec: Device | str | torch.device) -> Device:
    """A :class:`Device` from a Device, ``"cpu"``, ``"cpu:1"``, ``"cuda:0"`` or a torch.device."""
    if isinstance(spec, Device):
        return spec
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot use {spec!r} as a device; give 'cpu', 'cuda:N', a torch.device or a Device") from exc
    if dev.type == "cpu":
        return CpuDevice(dev.index or 0)
    if dev.type == "cuda":
        return CudaDevice(dev)
    raise ValueError(f"device type {dev.type!r} is not supported yet; use 'cpu' or 'cuda:N'")


def resolve_devices(devices: str | Sequence[Device | str | torch.device], n_layers: int, *,
                    processes: int = 1) -> list[Device]:
    """The device list of a pipeline. ``"auto"``: every GPU, else one CPU device per core.
    A CPU device without a thread count gets an even share of the cores, which ``processes``
    processes of this host share (ranks of a torchrun job)."""
    if isinstance(devices, str) and devices == "auto":
        if torch.cuda.is_available():
            devices = [CudaDevice(i) for i in range(torch.cuda.device_count())]
        else:
            devices = cpu_devices(max(1, min(available_cores(), n_layers)))
    elif isinstance(devices, (str, torch.device, Device)):
        devices = [devices]
    elif not isinstance(devices, Iterable):
        raise TypeError(f"devices must be 'auto', a device or a list of devices, got {devices!r}; for n CPU stages "
                        "pass devices=pa.cpu_devices(n), for GPUs e.g. devices=['cuda:0', 'cuda:1']")
    result = [as_device(d) for d in devices]
    if not result:
        raise ValueError("a pipeline needs at least one device")
    if len({id(d) for d in result}) != len(result):
        raise ValueError("the same Device object appears twice; create one per stage (e.g. cpu_devices(n))")
    cpus = [d for d in result if isinstance(d, CpuDevice)]
    for d in cpus:
        if d.threads is None:
            d.threads = max(1, available_cores() // (processes * len(cpus)))
    return result
