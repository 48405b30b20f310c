"""Keep tokens out of the hub's logs.

A browser's EventSource cannot send headers, so a subscribe token may come in
the query (``/events/?channel=...&token=<JWT>``). Access logs write the request
line; this filter rewrites a record's message and string arguments before any
handler formats them: the value of every ``token`` parameter becomes
``REDACTED``, and so does anything else shaped like a JWT (a token under
another name or percent-encoded). The nginx and Caddy snippets do the same in
their own log formats. It is installed on uvicorn's access logger in embedded
mode (``ssehub serve`` with no broker); under gunicorn the hub writes no access
log at all (the proxy keeps one).
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "REDACTED"
# `token=` as a query parameter (after ?, & or ;), any case, up to the next
# separator; a JWT is three base64url parts, the first a JSON object ("eyJ").
_TOKEN_PARAM = re.compile(r"([?&;]token=)[^&;\s\"']*", re.IGNORECASE)
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*")


def redact(text: str) -> str:
    """``text`` with token values and JWT-shaped strings replaced by REDACTED."""
    return _JWT.sub(REDACTED, _TOKEN_PARAM.sub(r"\g<1>" + REDACTED, text))


class RedactTokens(logging.Filter):
    """A logging filter that redacts tokens in a record; it never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with RedactTokens on every handler."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    return config
