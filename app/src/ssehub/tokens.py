"""Publisher and subscriber tokens: HS256 JWTs, a public contract.

Any JWT library can mint them, so users' own backends need not install ssehub::

    jwt.encode({"exp": now + 3600,
                "ssehub": {"publish": ["chat.*"], "subscribe": ["chat.*"]}},
               SSEHUB_TOKEN_SECRET, algorithm="HS256")

Only HS256 is accepted (never ``none``), ``exp`` is required, and a token is
checked once per request, never per event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jwt

from . import channels

ALGORITHM = "HS256"
CLAIM = "ssehub"


class TokenError(Exception):
    """The token is missing, malformed, badly signed or expired (HTTP 401)."""


@dataclass(frozen=True)
class Grant:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, channel: str) -> bool:
        return channels.matches(channel, self.publish)

    def may_subscribe(self, channel: str) -> bool:
        return channels.matches(channel, self.subscribe)


def mint(secret: str, *, publish: Sequence[str] = (), subscribe: Sequence[str] = (),
         ttl: int = 3600) -> str:
    """Return a token allowing ``publish`` and ``subscribe`` patterns for ``ttl`` seconds."""
    now = int(time.time())
    claims = {"iat": now, "exp": now + ttl,
              CLAIM: {"publish": list(publish), "subscribe": list(subscribe)}}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _patterns(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise TokenError(f"claim ssehub.{key} must be a list of channel patterns")
    return tuple(value)


def verify(secret: str, token: str) -> Grant:
    """Decode ``token``; raise TokenError with a short reason when it is not valid.

    A token that verified once is remembered (signature checks cost more than the
    rest of a publish); its ``exp`` is checked again at every use.
    """
    grant, expires = _verified(secret, token)
    if expires <= time.time():
        raise TokenError("token expired")
    return grant


@lru_cache(maxsize=4096)
def _verified(secret: str, token: str) -> tuple[Grant, float]:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.MissingRequiredClaimError:
        raise TokenError("token has no exp claim") from None
    except jwt.InvalidTokenError:
        raise TokenError("token invalid") from None
    grant = claims.get(CLAIM)
    if not isinstance(grant, dict):
        raise TokenError(f"token has no {CLAIM} claim")
    return (Grant(_patterns(grant.get("publish"), "publish"),
                  _patterns(grant.get("subscribe"), "subscribe")), float(claims["exp"]))
