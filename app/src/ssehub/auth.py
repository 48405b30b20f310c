"""Who may publish and who may subscribe: the one place both endpoints ask.

Owns the rules and their answers: a channel matching ``SSEHUB_PUBLIC_CHANNELS``
needs no token to subscribe; any other channel, and every publish, needs a
token whose grant covers it. A token that is missing, invalid or expired is a
401 with ``WWW-Authenticate: Bearer``; one that does not cover a channel a 403.
Where a token travels is http.py's (``Request.token``, ``Request.header_token``);
what a token holds and how it is verified is tokens.py's, the public contract.

Must not: run per event. A stream is authorised once, when it opens (a token
that expires later does not end it); a publish once, for its one channel.
"""

from __future__ import annotations

from . import channels, tokens
from .conf import Config
from .http import Headers, Refusal

UNAUTHORISED: Headers = [(b"www-authenticate", b'Bearer realm="ssehub"')]


def _grant(token: str, config: Config) -> tokens.Grant:
    try:
        return tokens.verify(config.token_secret, token)
    except tokens.TokenError as exc:
        raise Refusal(401, str(exc), UNAUTHORISED) from None


def authorise_subscriber(names: list[str], token: str | None, config: Config) -> None:
    """Raise Refusal (401/403) unless ``token`` may subscribe to every private channel
    of ``names``; a stream of public channels alone needs none."""
    private = [c for c in names if not channels.matches(c, config.public_channels)]
    if not private:
        return
    if token is None:
        raise Refusal(401, "a subscriber token is required for channel " + private[0],
                      UNAUTHORISED)
    grant = _grant(token, config)
    denied = [c for c in private if not grant.may_subscribe(c)]
    if denied:
        raise Refusal(403, "token does not allow subscribing to " + denied[0])


def publisher(token: str | None, config: Config) -> tokens.Grant:
    """The grant of a publisher's ``token``, or Refusal 401 (checked before the body is read)."""
    if token is None:
        raise Refusal(401, "a publisher token is required: Authorization: Bearer TOKEN",
                      UNAUTHORISED)
    return _grant(token, config)


def authorise_publish(grant: tokens.Grant, channel: str) -> None:
    """Raise Refusal 403 unless ``grant`` may publish to ``channel`` (a valid name)."""
    if not grant.may_publish(channel):
        raise Refusal(403, f"token does not allow publishing to {channel}")
