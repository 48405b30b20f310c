"""Django's routes: health, readiness, metrics and, with ``SSEHUB_DEMO`` on, the chat demo.

Must not: route ``/events/`` or ``/publish/`` (asgi.py serves them before Django).
"""

from django.urls import path

from . import conf, views

urlpatterns = [
    path("healthz", views.healthz),
    path("readyz", views.readyz),
    path("metrics", views.metrics_view),
]

if conf.get().demo:  # anyone may post to the demo: off unless SSEHUB_DEMO is on
    urlpatterns += [
        path("", views.chat, name="chat"),
        path("chat/messages/", views.chat_post, name="chat-post"),
    ]
