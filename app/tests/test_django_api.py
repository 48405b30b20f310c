"""The Python API inside Django: publish_on_save publishes after commit only (H3)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

pytestmark = pytest.mark.asyncio


async def test_h3_rollback_publishes_nothing_commit_publishes_once(django_db) -> None:  # type: ignore[no-untyped-def]
    from django.db import transaction

    from ssehub import conf
    from ssehub.hub import ensure_hub, shutdown_hub
    from ssehub.models import Message

    conf.reset()
    hub = await ensure_hub()
    try:
        subscriber = await hub.subscribe(["chat.h3"])

        def rolled_back() -> None:
            try:
                with transaction.atomic():
                    Message.objects.create(room="h3", author="a", text="never")
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass

        await sync_to_async(rolled_back)()
        await sync_to_async(Message.objects.create)(room="h3", author="a", text="kept")
        async with asyncio.timeout(3):
            while not [e for e in subscriber.buf if getattr(e, "channel", None)]:
                await subscriber.wait()
                await asyncio.sleep(0.05)
        events = [e for e in subscriber.buf if getattr(e, "channel", None)]
        assert [e.event for e in events] == ["message"]
        assert '"text":"kept"' in events[0].data
    finally:
        await shutdown_hub()
        conf.reset()
