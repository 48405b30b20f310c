"""A user's URLconf: the hub's routes and two ``@sse_stream`` views.

Each view writes ``closed-<tag>`` into SERVED_MARKERS when its generator is
closed, so the test can see a disconnect release the view.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path

from ssehub import sse_stream
from ssehub.urls import urlpatterns as hub_urlpatterns


def _closed(request: HttpRequest) -> None:
    Path(os.environ["SERVED_MARKERS"], f"closed-{request.GET['tag']}").touch()


@sse_stream
async def ticks(request: HttpRequest) -> AsyncIterator[Any]:
    try:
        for n in range(3):
            yield "tick", {"n": n}
            await asyncio.sleep(0.3)
        while True:  # then quiet: the heartbeats keep the stream open
            await asyncio.sleep(3600)
    finally:
        _closed(request)


@sse_stream
def sync_lines(request: HttpRequest) -> Iterator[Any]:
    try:
        for n in range(3):
            yield f"line {n}"
            time.sleep(0.2)
        while True:
            time.sleep(0.2)
            yield {"event": "still", "data": "here"}
    finally:
        _closed(request)


@sse_stream
def sync_orm(request: HttpRequest) -> Iterator[Any]:
    """A sync generator that reads the database at every step (F5 for custom streams)."""
    from ssehub.models import Message

    try:
        while True:
            yield {"event": "count", "data": Message.objects.count()}
            time.sleep(0.2)
    finally:
        _closed(request)


async def blocks_the_loop(request: HttpRequest) -> HttpResponse:
    """The E1 mistake on purpose: a blocking call in async code (the control
    for the slow-callback check the e2e stack runs)."""
    time.sleep(0.3)
    return HttpResponse("blocked the loop for 0.3 s\n")


urlpatterns = [*hub_urlpatterns, path("events/ticks/", ticks), path("events/lines/", sync_lines),
               path("events/orm/", sync_orm), path("blocks/", blocks_the_loop)]

