"""Channel: bounded FIFO, drop policies and their counts, close / abort, cancellation."""
from __future__ import annotations

import asyncio
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import partime_async as pa
from partime_async.aio.channel import POLICIES

HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def drain(ch: pa.Channel) -> list:
    out = []
    while True:
        try:
            out.append(ch.receive_nowait())
        except (asyncio.QueueEmpty, pa.EndOfStream):
            return out


# -- construction ---------------------------------------------------------------------------
def test_rejects_unknown_policy_and_bad_capacity():
    with pytest.raises(ValueError, match="unknown channel policy"):
        pa.Channel(2, "sometimes")
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="capacity"):
            pa.Channel(bad)


def test_latest_has_capacity_one():
    assert pa.Channel(10, "latest").capacity == 1


# -- policies, one by one ---------------------------------------------------------------------
def test_block_refuses_when_full_and_keeps_everything():
    ch = pa.Channel(3, "block")
    assert [ch.send_nowait(i) for i in range(5)] == [True, True, True, False, False]
    assert len(ch) == 3 and ch.dropped == 0 and ch.sent == 3
    assert drain(ch) == [0, 1, 2]
    assert ch.received == 3


def test_drop_oldest_keeps_the_newest_and_reports_each_drop():
    dropped = []
    ch = pa.Channel(3, "drop_oldest", on_drop=dropped.append)
    for i in range(10):
        assert ch.send_nowait(i) is True
    assert dropped == list(range(7))
    assert ch.dropped == 7
    assert drain(ch) == [7, 8, 9]
    assert ch.received + len(ch) + ch.dropped == 10


def test_drop_newest_keeps_the_oldest_and_reports_each_drop():
    dropped = []
    ch = pa.Channel(3, "drop_newest", on_drop=dropped.append)
    for i in range(10):
        assert ch.send_nowait(i) is True
    assert dropped == list(range(3, 10))
    assert ch.dropped == 7
    assert drain(ch) == [0, 1, 2]
    assert ch.received + len(ch) + ch.dropped == 10


def test_latest_keeps_only_the_newest():
    dropped = []
    ch = pa.Channel(5, "latest", on_drop=dropped.append)
    for i in range(10):
        ch.send_nowait(i)
    assert len(ch) == 1 and ch.dropped == 9 and dropped == list(range(9))
    assert drain(ch) == [9]


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "latest"])
async def test_drop_policies_never_block_a_sender(policy):
    ch = pa.Channel(2, policy)
    for i in range(20):
        await asyncio.wait_for(ch.send(i), 5)  # would hang if the policy blocked
    assert ch.dropped == 20 - ch.capacity
    assert len(ch) == ch.capacity


@given(policy=st.sampled_from(POLICIES), capacity=st.integers(1, 4),
       ops=st.lists(st.one_of(st.integers(0, 999), st.none()), max_size=40))
@HYPOTHESIS
def test_policies_match_a_model_queue(policy, capacity, ops):
    """Random send/receive sequences (an int: send it; None: receive) against a plain deque."""
    dropped: list[int] = []
    ch = pa.Channel(capacity, policy, on_drop=dropped.append)
    cap = 1 if policy == "latest" else capacity
    model: deque[int] = deque()
    model_dropped: list[int] = []
    received: list[int] = []
    sends = 0
    for op in ops:
        if op is None:
            if model:
                want = model.popleft()
                got = ch.receive_nowait()
                assert got == want
                received.append(got)
            else:
                with pytest.raises(asyncio.QueueEmpty):
                    ch.receive_nowait()
            continue
        sends += 1
        accepted = ch.send_nowait(op)
        if len(model) < cap:
            model.append(op)
            assert accepted is True
        elif policy == "block":
            assert accepted is False
            sends -= 1  # refused, nothing to account for
        elif policy == "drop_newest":
            model_dropped.append(op)
            assert accepted is True
        else:  # drop_oldest, latest
            model_dropped.append(model.popleft())
            model.append(op)
            assert accepted is True
        assert len(ch) == len(model) <= cap
    assert dropped == model_dropped
    assert ch.dropped == len(model_dropped)
    assert ch.received == len(received)
    # Every accepted send is accounted for exactly once: received, still queued, or dropped.
    assert ch.received + len(ch) + ch.dropped == sends
    assert drain(ch) == list(model)


# -- blocking and order ---------------------------------------------------------------------
async def test_block_sender_waits_for_room():
    ch = pa.Channel(1)
    await ch.send("a")
    sender = asyncio.create_task(ch.send("b"))
    await spin()
    assert not sender.done() and len(ch) == 1
    assert await ch.receive() == "a"
    await asyncio.wait_for(sender, 5)
    assert await ch.receive() == "b"
    assert ch.sent == 2 and ch.received == 2


async def test_blocked_senders_are_served_in_order():
    ch = pa.Channel(1)
    ch.send_nowait(0)
    senders = []
    for i in range(1, 4):
        senders.append(asyncio.create_task(ch.send(i)))
        await spin(2)
    got = [await ch.receive() for _ in range(4)]
    await asyncio.gather(*senders)
    assert got == [0, 1, 2, 3]


@given(capacity=st.integers(1, 4), n=st.integers(0, 40))
@HYPOTHESIS
async def test_producer_consumer_fifo_nothing_lost(capacity, n):
    ch = pa.Channel(capacity)

    async def produce():
        for i in range(n):
            await ch.send(i)
        ch.close()

    producer = asyncio.create_task(produce())
    got = [item async for item in ch]
    await producer
    assert got == list(range(n))
    assert ch.sent == ch.received == n and ch.dropped == 0


# -- close ------------------------------------------------------------------------------------
async def test_close_lets_receivers_drain_then_stop():
    ch = pa.Channel(4)
    for i in range(3):
        await ch.send(i)
    ch.close()
    assert ch.closed
    assert [x async for x in ch] == [0, 1, 2]
    with pytest.raises(pa.EndOfStream):
        await ch.receive()
    with pytest.raises(pa.EndOfStream):
        ch.receive_nowait()


async def test_send_after_close_raises():
    ch = pa.Channel(2)
    ch.close()
    ch.close()  # idempotent
    with pytest.raises(pa.ChannelClosed):
        await ch.send(1)
    with pytest.raises(pa.ChannelClosed):
        ch.send_nowait(1)
    assert ch.sent == 0


async def test_close_wakes_a_blocked_receiver_with_end_of_stream():
    ch = pa.Channel(2)
    receiver = asyncio.create_task(ch.receive())
    await spin()
    ch.close()
    with pytest.raises(pa.EndOfStream):
        await asyncio.wait_for(receiver, 5)


async def test_close_wakes_a_blocked_sender_with_channel_closed():
    ch = pa.Channel(1)
    await ch.send(0)
    sender = asyncio.create_task(ch.send(1))
    await spin()
    ch.close()
    with pytest.raises(pa.ChannelClosed):
        await asyncio.wait_for(sender, 5)
    assert [x async for x in ch] == [0]  # what was queued is still delivered


def test_receive_nowait_on_empty_open_channel():
    with pytest.raises(asyncio.QueueEmpty):
        pa.Channel(1).receive_nowait()


# -- abort ------------------------------------------------------------------------------------
class Boom(Exception):
    pass


async def test_abort_discards_items_and_raises_to_receivers():
    ch = pa.Channel(4)
    for i in range(3):
        ch.send_nowait(i)
    error = Boom("stage died")
    ch.abort(error)
    with pytest.raises(Boom) as info:
        await ch.receive()
    assert info.value is error
    with pytest.raises(Boom):
        ch.receive_nowait()
    with pytest.raises(Boom):
        async for _ in ch:
            pass
    assert len(ch) == 0


async def test_abort_raises_to_blocked_receivers_and_senders():
    empty, full = pa.Channel(1), pa.Channel(1)
    full.send_nowait("x")
    receivers = [asyncio.create_task(empty.receive()) for _ in range(2)]
    senders = [asyncio.create_task(full.send(i)) for i in range(2)]
    await spin()
    empty.abort(Boom("r"))
    full.abort(Boom("s"))
    for task in receivers + senders:
        with pytest.raises(Boom):
            await asyncio.wait_for(task, 5)
    with pytest.raises(Boom):
        await full.send("late")


async def test_abort_after_close_turns_the_end_into_an_error():
    ch = pa.Channel(2)
    ch.send_nowait(1)
    ch.close()
    ch.abort(Boom("late failure"))
    with pytest.raises(Boom):
        await ch.receive()


async def test_first_abort_wins():
    ch = pa.Channel(2)
    first = Boom("first")
    ch.abort(first)
    ch.abort(Boom("second"))
    with pytest.raises(Boom) as info:
        await ch.receive()
    assert info.value is first


# -- cancellation ---------------------------------------------------------------------------
async def test_cancelled_blocked_sender_leaves_the_channel_consistent():
    ch = pa.Channel(1)
    ch.send_nowait("kept")
    sender = asyncio.create_task(ch.send("cancelled"))
    await spin()
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
    assert len(ch) == 1 and ch.sent == 1
    assert await ch.receive() == "kept"
    await asyncio.wait_for(ch.send("next"), 5)  # no stale waiter blocks the next sender
    assert ch.receive_nowait() == "next"
    assert ch.sent == ch.received == 2


async def test_cancelled_blocked_receiver_does_not_lose_an_item():
    ch = pa.Channel(2)
    receiver = asyncio.create_task(ch.receive())
    await spin()
    receiver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiver
    ch.send_nowait("item")
    assert len(ch) == 1
    assert await asyncio.wait_for(ch.receive(), 5) == "item"


async def test_woken_sender_cancelled_before_it_runs_passes_its_turn_on():
    ch = pa.Channel(1)
    ch.send_nowait(0)
    first = asyncio.create_task(ch.send("first"))
    await spin()
    second = asyncio.create_task(ch.send("second"))
    await spin()
    assert ch.receive_nowait() == 0  # wakes `first` ...
    first.cancel()                   # ... which is cancelled before it gets to run
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 5)  # the free slot went to `second`
    assert drain(ch) == ["second"]


async def test_woken_receiver_cancelled_before_it_runs_passes_the_item_on():
    ch = pa.Channel(1)
    first = asyncio.create_task(ch.receive())
    await spin()
    second = asyncio.create_task(ch.receive())
    await spin()
    ch.send_nowait("item")  # wakes `first` ...
    first.cancel()          # ... which is cancelled before it takes the item
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == "item"
    assert ch.received == 1 and len(ch) == 0
