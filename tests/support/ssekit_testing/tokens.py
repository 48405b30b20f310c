"""Test tokens, minted as a user's backend mints them: PyJWT and the public
contract (HS256, ``exp``, the ``ssehub`` claim; see ssehub/tokens.py), not the
hub's own code. What the tests send is then also a check of that contract, and
the cluster's checks of a deployed hub need nothing of ssehub."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jwt


def signed(claims: dict[str, Any], secret: str, algorithm: str = "HS256") -> str:
    """Any claims, signed: for tokens the contract refuses or must tolerate."""
    return jwt.encode(claims, secret, algorithm=algorithm)


def mint(secret: str, *, publish: Sequence[str] = (), subscribe: Sequence[str] = (),
         ttl: int = 3600) -> str:
    """A token allowing the ``publish`` and ``subscribe`` patterns for ``ttl`` seconds."""
    now = int(time.time())
    return signed({"iat": now, "exp": now + ttl,
                   "ssehub": {"publish": list(publish), "subscribe": list(subscribe)}}, secret)


def bearer(token: str) -> dict[str, str]:
    """The Authorization header that carries ``token``."""
    return {"Authorization": f"Bearer {token}"}
