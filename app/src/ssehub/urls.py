from django.urls import path

from . import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("chat/messages/", views.chat_post, name="chat-post"),
    path("healthz", views.healthz),
    path("readyz", views.readyz),
    path("metrics", views.metrics_view),
]
