"""asyncio building blocks: bounded channels with drop policies and an explicit close, and the
bridge between threads and the event loop (work awaited to its end, results sent back in
batches)."""
from .channel import POLICIES, Channel, ChannelClosed, EndOfStream, Policy
from .threads import LoopNotifier, aclose_to_the_end, in_thread, resolve, retrieve, to_the_end

__all__ = ["POLICIES", "Channel", "ChannelClosed", "EndOfStream", "LoopNotifier", "Policy", "aclose_to_the_end",
           "in_thread", "resolve", "retrieve", "to_the_end"]
