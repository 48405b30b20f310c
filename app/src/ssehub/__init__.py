"""ssehub: durable Server-Sent Events for Django, fanned out per process.

Python API for Django code::

    import ssehub
    ssehub.publish("chat.lobby", {"text": "hi"}, event="message")       # sync code
    event_id = await ssehub.apublish("chat.lobby", "hi")                 # async code

Both store the event (it replays with ``Last-Event-ID``) and return its id.
``ssehub.sse_stream`` decorates custom stream views.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PublishError", "apublish", "publish", "sse_stream"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so importing ssehub (e.g. in settings or the CLI) loads no Django.
    if name in {"publish", "apublish"}:
        from . import api
        return getattr(api, name)
    if name == "PublishError":
        from .publishing import PublishError
        return PublishError
    if name == "sse_stream":
        from .decorators import sse_stream
        return sse_stream
    raise AttributeError(name)
