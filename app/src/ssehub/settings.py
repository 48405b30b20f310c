"""Django settings of the hub project, all derived from ``ssehub.conf``.

No GZipMiddleware (A6); no session or auth apps: the hub authenticates with
tokens, and the chat demo needs neither.
"""

from __future__ import annotations

from typing import Any

import dj_database_url

from ssehub import conf as _conf

_config = _conf.get()

SECRET_KEY = _config.secret_key
DEBUG = _config.debug
ALLOWED_HOSTS = list(_config.allowed_hosts)
CSRF_TRUSTED_ORIGINS = list(_config.csrf_trusted_origins)
CSRF_COOKIE_SECURE = _config.secure_cookies

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "ssehub",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "ssehub.urls"
APPEND_SLASH = True
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
}]

if _config.database_url:
    _db: dict[str, Any] = dict(dj_database_url.parse(_config.database_url, conn_max_age=0))
else:
    # 0700 as when secrets are generated into it: the database is the demo's messages.
    _config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(_config.data_dir / "ssehub.sqlite3")}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STATIC_URL = "/static/"
STATIC_ROOT = _config.static_root

USE_TZ = True
TIME_ZONE = "UTC"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"ssehub": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
USE_X_FORWARDED_HOST = True
