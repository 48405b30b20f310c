from django.apps import AppConfig


class SsehubConfig(AppConfig):
    name = "ssehub"
    verbose_name = "SSE hub"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from .models import Message, publish_on_save

        publish_on_save(Message, channel=lambda m: f"chat.{m.room}", data=Message.as_event,
                        event="message")
