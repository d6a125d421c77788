"""Transports: how jobs move between neighbouring stages and gradients back.

``base.py`` (the ends every transport offers, and the :class:`Job` they carry), ``local.py``
(a channel and a gradient box on the event loop), ``chain.py`` (worker thread to worker
thread between consecutive CPU stages).
"""
from ..core.job import Job
from .base import GradReceiver, GradSender, Inlet, Outlet, Receiver, Sender
from .chain import Step, ThreadChain
from .local import GradBox, local_link

__all__ = ["GradBox", "GradReceiver", "GradSender", "Inlet", "Job", "Outlet", "Receiver", "Sender", "Step",
           "ThreadChain", "local_link"]
