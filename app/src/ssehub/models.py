"""The chat demo's model and the publish-on-save helper (seed 003's idea)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import models, transaction
from django.db.models.signals import post_save


class Message(models.Model):
    room = models.CharField(max_length=63, default="lobby")
    author = models.CharField(max_length=40)
    text = models.TextField(max_length=4000)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def as_event(self) -> dict[str, Any]:
        return {"id": self.pk, "room": self.room, "author": self.author, "text": self.text,
                "created": self.created.isoformat()}


def publish_on_save(model: type[models.Model], channel: Callable[[Any], str],
                    data: Callable[[Any], Any], event: str | None = None) -> None:
    """Publish ``data(instance)`` on ``channel(instance)`` after every committed save.

    The publish runs in ``transaction.on_commit``, so a rolled-back save publishes
    nothing and subscribers never see a row that does not exist.
    """
    def handler(sender: type[models.Model], instance: Any, **kwargs: Any) -> None:
        from . import publish
        transaction.on_commit(lambda: publish(channel(instance), data(instance), event=event))

    post_save.connect(handler, sender=model, weak=False,
                      dispatch_uid=f"ssehub-publish-{model._meta.label}")
