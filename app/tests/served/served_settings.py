"""A user's Django settings: the hub's, plus their own URLs with ``@sse_stream``
views (test_sse_stream_served.py runs it under ``ssehub serve``)."""

from ssehub.settings import *  # noqa: F403

ROOT_URLCONF = "served_urls"
