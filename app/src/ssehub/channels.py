"""Channel names and shell-style channel patterns.

A channel name is 1 to 63 characters: ASCII letters and digits, then also
``.``, ``_``, ``-``, ``:`` and ``@``; it starts with a letter or digit. 63 is
PostgreSQL's identifier limit, so every name is also a valid LISTEN channel.
Patterns (in tokens and ``SSEHUB_PUBLIC_CHANNELS``) use ``fnmatch`` syntax:
``chat.*``, ``user.42.*``, ``*``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from functools import lru_cache

_NAME_CHARS = "A-Za-z0-9._:@-"
CHANNEL_PATTERN = rf"^[A-Za-z0-9][{_NAME_CHARS}]{{0,62}}$"
_CHANNEL = re.compile(CHANNEL_PATTERN)
# A pattern: channel characters and fnmatch's wildcards, no longer than a name.
_PATTERN = re.compile(rf"[*?\[\]!{_NAME_CHARS}]{{1,63}}")  # "-" last: a literal


class InvalidChannel(ValueError):
    pass


def validate(name: object) -> str:
    """Return ``name`` if it is a valid channel name, else raise InvalidChannel."""
    if not isinstance(name, str) or not _CHANNEL.fullmatch(name):
        shown = repr(name)[:80]
        raise InvalidChannel(
            f"invalid channel {shown}: use 1-63 characters, letters, digits and . _ - : @, "
            "starting with a letter or digit"
        )
    return name


def scoped_key(channel: str, key: str) -> str:
    """The stored form of an Idempotency-Key: the publisher's key within its channel,
    so a key another tenant used never answers for this one. "/" ends the channel:
    no channel name holds one, so no two (channel, key) pairs meet."""
    return f"{channel}/{key}"


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it can match channel names, else raise InvalidChannel."""
    if not _PATTERN.fullmatch(pattern):
        raise InvalidChannel(f"{pattern!r} is not a channel pattern (channel characters "
                             "and the wildcards * ? [ ])")
    return pattern


@lru_cache(maxsize=1024)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def matches(channel: str, patterns: Iterable[str]) -> bool:
    """True when ``channel`` matches one of the shell-style ``patterns``."""
    regex = _compiled(tuple(patterns))
    return regex is not None and regex.match(channel) is not None
