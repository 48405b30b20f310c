"""Publisher and subscriber tokens: HS256 JWTs, a public contract.

Any JWT library can mint them, so users' own backends need not install ssehub::

    jwt.encode({"exp": now + 3600,
                "ssehub": {"publish": ["chat.*"], "subscribe": ["chat.*"]}},
               SSEHUB_TOKEN_SECRET, algorithm="HS256")

Only HS256 is accepted (never ``none``), ``exp`` is required, and a token is
checked once per request, never per event.

Owns the token's format: minting (the CLI, the chat demo, users' tests) and
verifying a token into a ``Grant``. Must not: answer HTTP or decide who may
publish or subscribe: auth.py is the one caller of ``verify`` and turns its
``TokenError`` into a 401.

What is accepted, so tokens from other JWT libraries work (docs/http-contract.md, "The HTTP
contract"): ``exp`` must be an integer (a JSON number without fraction or
exponent) from 1 to MAX_EXP; a string or ``1e300`` is refused, and a value no
date type can hold (``10**400``) is a 401, not a 500. ``exp`` and ``nbf`` allow
LEEWAY_SECONDS of clock skew. The registered claims the contract does not use
(``iat``, ``sub``, ``jti``, ``aud``, ``iss``) and any other claim are ignored,
whatever their type: PyJWT's checks refused an integer ``sub``, any ``aud``
and an ``iat`` a second ahead of this clock.
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
LEEWAY_SECONDS = 5  # clock skew allowed on exp and nbf: NTP-synced hosts are far closer
MAX_EXP = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime holds


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
    if expires + LEEWAY_SECONDS <= time.time():
        raise TokenError("token expired")
    return grant


@lru_cache(maxsize=4096)
def _verified(secret: str, token: str) -> tuple[Grant, int]:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], leeway=LEEWAY_SECONDS,
                            options={"require": ["exp"], "verify_exp": False,
                                     "verify_iat": False, "verify_aud": False,
                                     "verify_iss": False, "verify_sub": False,
                                     "verify_jti": False})
    except jwt.MissingRequiredClaimError:
        raise TokenError("token has no exp claim") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("token not valid yet (nbf)") from None
    except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError, RecursionError):
        # PyJWT's own checks raise more than InvalidTokenError on odd claims (an nbf of
        # 1e400 is an OverflowError): any of them is a bad token, a 401, one log line.
        raise TokenError("token invalid") from None
    expires = claims["exp"]
    if type(expires) is not int or not 0 < expires <= MAX_EXP:
        raise TokenError(f"token exp must be an integer from 1 to {MAX_EXP}")
    grant = claims.get(CLAIM)
    if not isinstance(grant, dict):
        raise TokenError(f"token has no {CLAIM} claim")
    return (Grant(_patterns(grant.get("publish"), "publish"),
                  _patterns(grant.get("subscribe"), "subscribe")), expires)
