"""Issue 10: a fuzzer that keeps the hostile-input fixes true.

Hypothesis generates what a hostile publisher or browser can send: bodies
(bytes, JSON of any shape, the publish fields with values of every type),
headers (tokens forged, expired, signed with odd claims, or garbage; content
types; idempotency keys; Last-Event-ID of any length), query strings and
cookies, at ``/publish/``, ``/events/`` and the chat demo's form, on
``ssehub serve`` with the memory and the Redis broker. It fails on any 5xx,
on any answer slower than the command timeout, and on a worker whose memory
keeps growing over the run. Bounded: SSEHUB_FUZZ_EXAMPLES examples per
endpoint and broker (default 150; a run takes about a minute).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env
from ssekit_testing.servers import Redis
from ssekit_testing.servers import ServedHub as Served

EXAMPLES = int(os.environ.get("SSEHUB_FUZZ_EXAMPLES", "150"))
# An answer must come within the hub's command timeout (5 s), whatever it is.
ANSWER_WITHIN = 5.5
# How long a stream that answered 200 is read before it counts as alive.
STREAM_READ = 0.3
# Worker memory over the whole run beyond what the first examples settled at.
MEMORY_GROWTH_LIMIT = 32 * 2**20

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    env = base_env(SSEHUB_DATA_DIR=str(directory), SSEHUB_REDIS_PREFIX="fuzz:",
                   SSEHUB_PUBLIC_CHANNELS="public.*", SSEHUB_DEMO="1",
                   SSEHUB_DEMO_POSTS_PER_MINUTE="100000")
    if request.param == "memory":
        env["SSEHUB_BROKER_URL"] = "memory://"
    else:
        redis: Redis = request.getfixturevalue("redis_server")
        env["SSEHUB_BROKER_URL"] = redis.url
    hub = Served(directory, env, workers=1)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(ANSWER_WITHIN + 5)) as c:
        yield c


def worker_rss(served: Served) -> int:
    assert served.process is not None
    master = served.process.pid
    # gunicorn's one worker; with the memory broker ``ssehub serve`` is one process.
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    worker = children[0] if children else master
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{worker}/status").read_text(), re.M)
    assert match
    return int(match.group(1)) * 1024


# --- what a hostile client sends -------------------------------------------------

# Header values h11 can put on the wire: no CR, LF or NUL; obs-text allowed.
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    blacklist_characters="\x7f"), max_size=300)
# Ids: short, and past Python's 4,300-digit int() limit.
DIGITS = st.one_of(st.from_regex(r"\A[0-9]{1,25}\Z"),
                   st.integers(4000, 6000).map(lambda n: "7" * n))
CHANNELS = st.one_of(st.sampled_from(["public.a", "priv.b", "a" * 64, "a" * 300, "",
                                      "public.*", "~listener", "a/b", "ünï", "x\x00y"]),
                     st.text(max_size=80))
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                      st.text(max_size=200), st.from_regex(r"\A[0-9]{300,5000}\Z"))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30)
CLAIM_VALUES = st.one_of(JSON_ANY, st.integers(min_value=-2**70, max_value=2**70),
                         st.just(10**400), st.just(1e300), st.just("9999999999"))


def _sign(claims: dict[str, Any], algorithm: str) -> str:
    try:
        return tokens.signed(claims, SECRET, algorithm)
    except (TypeError, ValueError, OverflowError):
        return "not.a.token"


TOKENS = st.one_of(
    st.just(tokens.mint(SECRET, ttl=300, publish=["*"], subscribe=["*"])),
    st.just(tokens.mint(SECRET, ttl=-10, publish=["*"])),
    st.builds(lambda p, s: tokens.mint(SECRET, ttl=300, publish=p, subscribe=s),
              st.lists(HEADER_TEXT, max_size=3), st.lists(HEADER_TEXT, max_size=3)),
    # Grants that would pass, with registered claims of any value and type.
    st.builds(lambda claims: _sign({"ssehub": {"publish": ["*"], "subscribe": ["*"]},
                                    **claims}, "HS256"),
              st.fixed_dictionaries({"exp": CLAIM_VALUES}, optional={
                  "iat": CLAIM_VALUES, "nbf": CLAIM_VALUES, "aud": CLAIM_VALUES})),
    st.builds(_sign, st.fixed_dictionaries({}, optional={
        "exp": CLAIM_VALUES, "iat": CLAIM_VALUES, "nbf": CLAIM_VALUES, "aud": CLAIM_VALUES,
        "sub": CLAIM_VALUES, "jti": CLAIM_VALUES,
        "ssehub": st.one_of(JSON_ANY, st.fixed_dictionaries(
            {}, optional={"publish": JSON_ANY, "subscribe": JSON_ANY}))}),
        st.sampled_from(["HS256", "HS512"])),
    HEADER_TEXT,
)
PUBLISH_BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON_ANY.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"channel": CHANNELS}, optional={
        "data": st.one_of(JSON_ANY, st.text(max_size=3000)), "event": JSON_ANY,
        "id": JSON_ANY, "retry": JSON_ANY}).map(
            lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(1, 100_000)),
)


def _headers(**values: str | None) -> list[tuple[bytes, bytes]]:
    # h11 sends no value with whitespace around it: what a proxy would pass on.
    return [(k.replace("_", "-").encode(), v.strip(" \t").encode("latin-1"))
            for k, v in values.items() if v is not None]


def check(response: httpx.Response, elapsed: float, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    assert elapsed < ANSWER_WITHIN, (what, elapsed)


# --- the fuzzer -------------------------------------------------------------------


def test_hostile_requests_get_an_answer_below_500_in_time_and_memory_stays_bounded(
        served: Served, client: httpx.Client) -> None:
    started = time.monotonic()
    rss: list[int] = []

    @FUZZ
    @given(body=PUBLISH_BODIES, token=st.one_of(st.none(), TOKENS),
           content_type=st.one_of(st.none(), st.just("application/json"), HEADER_TEXT),
           key=st.one_of(st.none(), HEADER_TEXT))
    def publish(body: bytes, token: str | None, content_type: str | None,
                key: str | None) -> None:
        headers = _headers(authorization=None if token is None else f"Bearer {token}",
                           content_type=content_type, idempotency_key=key)
        start = time.monotonic()
        response = client.post(f"{served.url}/publish/", content=body, headers=headers)
        check(response, time.monotonic() - start, f"publish {body[:200]!r} {headers!r:.400}")

    @FUZZ
    @given(channel=st.one_of(st.just("public.a"), CHANNELS),
           query=st.lists(st.tuples(st.sampled_from(["channel", "token", "lastEventId",
                                                     "x"]),
                                    st.one_of(CHANNELS, TOKENS, DIGITS)), max_size=8),
           last_id=st.one_of(st.none(), DIGITS, HEADER_TEXT),
           cookie=st.one_of(st.none(), HEADER_TEXT,
                            TOKENS.map(lambda t: f"theme=dark mode; ssehub_token={t}")))
    def events(channel: str, query: list[tuple[str, str]], last_id: str | None,
               cookie: str | None) -> None:
        headers = _headers(last_event_id=last_id, cookie=cookie)
        params = [(k, v.replace("\x00", "")) for k, v in [("channel", channel), *query]]
        start = time.monotonic()
        what = f"events {params!r:.400} {headers!r:.400}"
        with client.stream("GET", f"{served.url}/events/", params=params, headers=headers,
                           timeout=httpx.Timeout(ANSWER_WITHIN, read=STREAM_READ)) as response:
            check(response, time.monotonic() - start, what)
            if response.status_code != 200:
                response.read()
                return
            # A stream stays open (replay, then heartbeats): one the hub cuts (an
            # exception after the headers) ends its chunked body early.
            try:
                for _ in response.iter_raw():
                    pass
            except httpx.ReadTimeout:
                pass
            except httpx.RemoteProtocolError as exc:
                raise AssertionError(f"the hub cut the stream: {what}") from exc

    @FUZZ
    @given(fields=st.dictionaries(st.sampled_from(["text", "author", "room", "x"]),
                                  st.text(max_size=5000), max_size=4),
           room=st.one_of(st.none(), st.text(max_size=100)))
    def chat(fields: dict[str, str], room: str | None) -> None:
        page = client.get(f"{served.url}/")
        token = page.cookies.get("csrftoken", "")
        params = {} if room is None else {"room": room.replace("\x00", "")}
        start = time.monotonic()
        response = client.post(
            f"{served.url}/chat/messages/", params=params,
            data={k: v.encode("utf-8", "surrogatepass") for k, v in fields.items()},
            headers={"X-CSRFToken": token})
        check(response, time.monotonic() - start, f"chat {fields!r:.400} {params!r:.400}")

    for run in (publish, events, chat):
        run()
        rss.append(worker_rss(served))
    for run in (publish, events, chat):  # the same again: memory must have settled
        run()
        rss.append(worker_rss(served))
    mb = [round(r / 2**20, 1) for r in rss]
    print(f"\nfuzz: {6 * EXAMPLES} generated requests in {time.monotonic() - started:.0f} s, "
          f"worker RSS after each round {mb} MB")
    assert rss[-1] - rss[2] < MEMORY_GROWTH_LIMIT, mb
