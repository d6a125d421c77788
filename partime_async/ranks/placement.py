"""Where stages run when a pipeline spans processes: ``"rank1:cpu"``, ``"rank2:cuda:0"``.

Every rank runs the same script (started by ``torchrun``); each resolves the same device list:
a stage placed on this rank gets a real device here, a stage placed on another rank a
:class:`~partime_async.ranks.device.RankDevice` that stands for it. A device without a rank
(``"cpu"``, ``"cuda:0"``, a :class:`Device`) is on the driving rank, rank 0.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..devices import Device, resolve_devices
from .device import RankDevice
from .link import links_group, local_world_size

DRIVING_RANK = 0
_RANKED = re.compile(r"^rank(\d+):(.+)$")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init(*, timeout: float = 120.0, backend: str = "gloo") -> None:
    """Join this process to the others of its ``torchrun`` job (once; later calls do nothing).

    The ranks meet through the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``). ``timeout``: how long to wait for every rank to join
    (the links between stages wait for their peers as long as a run idles: see
    :data:`~partime_async.ranks.link.LINK_TIMEOUT`). A pipeline whose devices name ranks
    calls this itself; call it first to choose the timeout.
    """
    if dist.is_initialized():
        links_group()
        return
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f"the devices name ranks, but this process was not started by torchrun "
                           f"({', '.join(missing)} not set): run the script with e.g. "
                           "`torchrun --nproc-per-node 2 script.py`, on every host of the job")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        # Left to the interpreter's exit, gloo's threads are torn down while still joinable
        # (the process aborts); every link has ended by then, nothing is pending.
        atexit.register(_leave)
    except Exception as exc:
        raise RuntimeError(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: the ranks did not all join "
                           f"within {timeout:g} s ({type(exc).__name__}: {exc}); start every rank with the same "
                           "torchrun command (same --nnodes, --nproc-per-node and --rdzv-endpoint) and check that "
                           f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is reachable") from exc
    links_group()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 when it is not part of a job)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The processes of the job (1 when this one is not part of one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def one_stage_per_rank(kind: str = "cpu") -> list[str]:
    """A device list with one stage on every rank of the job, in rank order: ``kind`` is
    ``"cpu"`` or ``"cuda"`` (each rank's own GPU, ``cuda:LOCAL_RANK``)."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    if not dist.is_initialized():
        init()
    return [f"rank{r}:{kind}" for r in range(world_size())]


def is_ranked(devices: Any) -> bool:
    """Whether a ``devices=`` argument places any stage on a rank."""
    if isinstance(devices, (str, torch.device, Device)):
        devices = [devices]
    try:
        return any(isinstance(d, str) and _RANKED.match(d) for d in devices)
    except TypeError:
        return False


def resolve_ranked(devices: Sequence[Any], n_units: int) -> tuple[list[Device], set[int]]:
    """This rank's view of a device list that names ranks: the devices (real ones for the
    stages placed here, :class:`RankDevice` for the others) and the indices of the stages
    this rank runs."""
    init()
    me, world = rank(), world_size()
    specs: list[Any] = []
    ranks: list[int] = []
    for spec in devices:
        match = _RANKED.match(spec) if isinstance(spec, str) else None
        where, what = (int(match[1]), match[2]) if match else (DRIVING_RANK, spec)
        if where >= world:
            raise ValueError(f"{spec!r} names rank {where}, but the job has {world} ranks (0-{world - 1}); start it "
                             f"with more processes (torchrun --nproc-per-node) or place the stage on another rank")
        if isinstance(what, str):
            _check_spec(spec, what)  # on every rank: a bad one stops them all, each saying why
            if what == "cuda":
                what = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if where == me else "cuda"
        ranks.append(where)
        specs.append(what)
    mine = {k for k, where in enumerate(ranks) if where == me}
    # The cores are shared by the processes of this host, then by this one's stages.
    local = resolve_devices([specs[k] for k in sorted(mine)], n_units, processes=local_world_size()) if mine else []
    resolved: list[Device] = []
    it = iter(local)
    for k, (where, what) in enumerate(zip(ranks, specs, strict=True)):
        name = what.name if isinstance(what, Device) else str(what)
        resolved.append(next(it) if k in mine else RankDevice(where, name))
    return resolved, mine


def _check_spec(spec: str, what: str) -> None:
    try:
        kind = torch.device(what).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot use {spec!r} as a device: {what!r} is not 'cpu', 'cuda' or 'cuda:N'") from exc
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"cannot use {spec!r} as a device: a stage on a rank runs on 'cpu' or 'cuda[:N]'")


