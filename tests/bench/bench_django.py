"""``run.py --django-path``: the same fan-out through Django's StreamingHttpResponse.

Settings and URLconf in one module (``DJANGO_SETTINGS_MODULE=bench_django``):
the hub's own, plus ``/events/django/``, an ``@sse_stream`` view that takes its
events from the same hub subscriber the thin path uses. The difference between
the two is Django's response machinery (one ``send`` per chunk through the
handler, middleware), which is what the thin ``/events/`` path avoids.
"""

from ssehub.settings import *  # noqa: F403

ROOT_URLCONF = "bench_django"


def _urlpatterns() -> list:  # type: ignore[type-arg]
    from collections.abc import AsyncIterator

    from django.http import HttpRequest
    from django.urls import path
    from ssehub import sse_stream
    from ssehub.hub import ensure_hub
    from ssehub.urls import urlpatterns as hub_urlpatterns

    @sse_stream
    async def django_stream(request: HttpRequest) -> AsyncIterator[object]:
        hub = await ensure_hub()
        subscriber = await hub.subscribe(request.GET.getlist("channel"))
        try:
            while True:
                await subscriber.wait()
                batch, subscriber.buf = subscriber.buf, []
                for item in batch:
                    for event in getattr(item, "events", (item,)):
                        if getattr(event, "id", None) is not None:
                            yield event
        finally:
            hub.unsubscribe(subscriber)

    return [*hub_urlpatterns, path("events/django/", django_stream)]


def __getattr__(name: str) -> object:  # the URLconf, built once Django is set up
    if name == "urlpatterns":
        globals()["urlpatterns"] = patterns = _urlpatterns()
        return patterns
    raise AttributeError(name)
