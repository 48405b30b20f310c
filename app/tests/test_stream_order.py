"""Frames reach a stream in id order, once: the direct write meets a paused socket,
and a Last-Event-ID replay meets the live events it already covered.

The hub writes each event straight to an idle, writable stream's socket
(subscriber.Subscriber.push); otherwise the stream's task sends what was buffered.
uvicorn's ``send`` waits for a paused socket to drain *before* writing, so once
the socket drained, the next event found an empty buffer and a writable socket
and went out ahead of the frames the task still held: ids out of order, and
the client's next Last-Event-ID replay repeated events. The transport and
flow control below stand in for uvicorn's (the interleaving cannot be forced
on a real socket); the task and the subscriber are the hub's own.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from ssehub.sse import Event
from ssehub.subscriber import Subscriber


@pytest.mark.asyncio
async def test_direct_write_waits_for_frames_the_task_is_still_sending() -> None:
    wire: list[bytes] = []
    flow = SimpleNamespace(write_paused=True)
    transport = SimpleNamespace(write=wire.append)
    drained = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:  # uvicorn's order: drain, then write
        if flow.write_paused:
            await drained.wait()
        wire.append(message["body"])

    subscriber = Subscriber(("c",), limit=100)
    subscriber.cycle = SimpleNamespace(transport=transport, flow=flow, disconnected=False)
    subscriber.chunked = False
    task = asyncio.create_task(subscriber.pump(send))
    first, second, third = (Event("c", f"n{i}", None, i) for i in (1, 2, 3))

    subscriber.push(first)  # the socket is paused: buffered for the task
    await asyncio.sleep(0)  # the task takes it and waits in send for the drain
    assert subscriber.sending and not subscriber.buf
    flow.write_paused = False  # drained; the task has not resumed yet
    drained.set()
    subscriber.push(second)  # must queue behind the first
    await asyncio.sleep(0.01)
    subscriber.push(third)  # idle and writable again: straight to the socket
    assert wire[-1] == third.frame
    subscriber.close()
    await asyncio.wait_for(task, 2)
    assert b"".join(wire) == first.frame + second.frame + third.frame


def test_live_events_the_replay_sent_are_not_sent_again() -> None:
    """After a Last-Event-ID replay up to id 5 (floor), the listener may still
    deliver 4 and 5 live (it lags behind the replay's read): they are dropped,
    also out of a Batch that straddles the floor; newer ids, heartbeats and raw
    events pass."""
    from ssehub.hub import HEARTBEAT, Batch

    subscriber = Subscriber(("c",), limit=100)
    subscriber.floor = 5
    events = {i: Event("c", f"n{i}", None, i) for i in range(3, 9)}
    subscriber.push(events[5])
    subscriber.push(Batch([events[3], events[4], events[6]]))
    subscriber.push(HEARTBEAT)
    subscriber.push(Event("c", "raw"))
    subscriber.push(Batch([events[7], events[8]]))
    sent = [e for item in subscriber.buf for e in getattr(item, "events", [item])]
    assert [getattr(e, "id", None) for e in sent] == [6, None, None, 7, 8]
    # 6 passed on a one-channel stream: nothing older can follow, the check is off.
    assert subscriber.floor == 0


def test_the_floor_stays_on_streams_of_several_channels() -> None:
    """Ids order events across channels, but each channel arrives in its own
    order: after a newer id on one channel, an older one may still come on the
    other."""
    subscriber = Subscriber(("a", "b"), limit=100)
    subscriber.floor = 5
    for event in (Event("a", "new", None, 6), Event("b", "replayed", None, 4),
                  Event("b", "new", None, 7)):
        subscriber.push(event)
    assert [e.id for e in subscriber.buf] == [6, 7] and subscriber.floor == 5
