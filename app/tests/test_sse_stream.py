"""``@sse_stream``: sync and async generators, every yield format, heartbeats (F1/F2, E1).

Warnings are errors in this suite (pyproject), so Django's "StreamingHttpResponse
must consume synchronous iterators" warning would fail these tests.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def rf():  # type: ignore[no-untyped-def]
    import django
    from django.test import RequestFactory

    django.setup()
    return RequestFactory()


async def consume(response, count: int, timeout: float = 5, close: bool = True) -> list[bytes]:  # type: ignore[no-untyped-def]
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            async for chunk in response.streaming_content:
                chunks.append(chunk)
                if len(chunks) >= count:
                    break
    finally:
        if close:
            # Closed inside the test's loop (a server drops it when the client leaves);
            # left to the garbage collector, its cleanup could outlive the loop.
            await response._iterator.aclose()
    return chunks


async def test_f2_sync_generator_runs_off_the_event_loop(rf) -> None:  # type: ignore[no-untyped-def]
    from ssehub import sse_stream
    from ssehub.sse import Event

    @sse_stream
    def view(request):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # a blocking call, as sync code does
        yield "plain"
        yield ("update", "tuple")
        yield {"event": "d", "data": "dict", "id": 7}
        yield Event("c", "object", "obj", 8)

    response = await view(rf.get("/"))
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache" and response["X-Accel-Buffering"] == "no"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    chunks = await consume(response, 5)
    task.cancel()
    assert chunks[0].startswith(b"retry: ")
    assert chunks[1:] == [b"data: plain\n\n", b"event: update\ndata: tuple\n\n",
                          b"id: 7\nevent: d\ndata: dict\n\n",
                          b"id: 8\nevent: obj\ndata: object\n\n"]
    assert ticks >= 5, "the event loop was blocked while the sync generator slept"


async def test_f1_async_generator_gets_heartbeats_while_quiet(rf, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ssehub import conf, sse_stream

    monkeypatch.setenv("SSEHUB_HEARTBEAT", "0.1")
    conf.reset()
    closed = asyncio.Event()

    @sse_stream
    async def view(request):  # type: ignore[no-untyped-def]
        try:
            await asyncio.sleep(0.35)
            yield "late"
        finally:
            closed.set()

    response = await view(rf.get("/"))
    chunks = await consume(response, 100)  # to the end of the generator
    assert chunks[1:4] == [b":\n\n"] * 3 and chunks[4:] == [b"data: late\n\n"]
    assert closed.is_set()

    # F3: a client that goes away mid-stream cancels the response; clean-up runs.
    closed.clear()
    response = await view(rf.get("/"))
    reader = asyncio.create_task(consume(response, 100))
    await asyncio.sleep(0.15)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    conf.reset()
    assert closed.is_set()


async def test_yields_cannot_forge_fields_and_data_becomes_json(rf) -> None:  # type: ignore[no-untyped-def]
    from ssehub import sse_stream

    @sse_stream
    def view(request):  # type: ignore[no-untyped-def]
        yield ("score", {"home": 2, "away": 1})
        yield {"data": [1, "zwei"], "id": 3}
        yield ("x\ndata: forged", "payload")

    response = await view(rf.get("/"))
    chunks = await consume(response, 3, close=False)
    assert chunks[1:] == [b'event: score\ndata: {"home":2,"away":1}\n\n',
                          b'id: 3\ndata: [1,"zwei"]\n\n']
    with pytest.raises(ValueError, match="CR or LF"):
        await consume(response, 1)


async def test_yields_are_encoded_as_the_publish_api_encodes_data(rf) -> None:  # type: ignore[no-untyped-def]
    """One encoding for @sse_stream and POST /publish/ (sse.data_text): UTF-8 kept as
    it is, and only JSON. The decorator used to send NaN, which no JSON parser reads."""
    from ssehub import sse, sse_stream

    @sse_stream
    def view(request):  # type: ignore[no-untyped-def]
        yield ("profile", {"name": "Zoë"})
        yield ("score", {"home": float("nan")})

    response = await view(rf.get("/"))
    chunks = await consume(response, 2, close=False)
    assert sse.data_text({"name": "Zoë"}) == '{"name":"Zoë"}'
    assert chunks[1] == 'event: profile\ndata: {"name":"Zoë"}\n\n'.encode()
    with pytest.raises(ValueError, match="JSON"):
        await consume(response, 1)
