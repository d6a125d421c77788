"""Devices: where a stage runs, and how the event loop waits for it without blocking.

Every difference between a CPU and a GPU lives in this package, behind :class:`Device`
(``base.py`` states the contract): ``cpu.py`` (a worker thread per stage), ``cuda.py``
(streams, pooled events, waiter threads, pinned staging), ``cuda_graphs.py`` (a stage as
CUDA graphs), ``resolve.py`` (what ``devices=`` may say).
"""
from .base import Device, InlineMode, Ticket, Work, settle
from .cpu import CpuDevice, WorkerDied
from .cuda import CudaDevice, EventPool, EventWaiter
from .resolve import as_device, available_cores, cpu_devices, resolve_devices

__all__ = ["CpuDevice", "CudaDevice", "Device", "EventPool", "EventWaiter", "InlineMode", "Ticket", "Work",
           "WorkerDied", "as_device", "available_cores", "cpu_devices", "resolve_devices", "settle"]
