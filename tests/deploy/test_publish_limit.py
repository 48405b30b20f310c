"""An app backend that publishes 100 events a second from one address is not
throttled by the nginx snippet (issue 13, part 5).

Regression: the per-address publish limit was 50 per second with bursts of
200, so a backend that publishes from one host at 100/s had about a third of
its publishes refused with 429 once the burst was used up, while one hub worker
stores over 4,000/s; a publisher that does not retry lost them. The snippet
now allows 1,000/s with bursts of 2,000 per address (and none for addresses in
its geo block). Real nginx with templates/nginx in front of the session's hub.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET
from ssekit_testing.servers import Nginx, ServedHub

RATE = 100  # publishes per second, from one address
SECONDS = 6  # past the old burst: 200 + 50/s x 6 s = 500 of 600 allowed


async def test_a_backend_publishing_100_a_second_is_not_throttled(
        stack: tuple[ServedHub, Nginx]) -> None:
    _, nginx = stack
    channel = "limit.backend"
    headers = {"Authorization": f"Bearer {tokens.mint(SECRET, publish=[channel])}"}
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=32)) as client:
        async def publish(seq: int) -> int:
            answer = await client.post(f"{nginx.url}/publish/", headers=headers,
                                       json={"channel": channel, "data": f"e{seq}"})
            return answer.status_code

        start = time.monotonic()
        tasks = []
        for seq in range(RATE * SECONDS):
            delay = start + seq / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(publish(seq)))
        statuses = await asyncio.gather(*tasks)
    took = time.monotonic() - start
    refused = statuses.count(429)
    print(f"\n{len(statuses)} publishes at {len(statuses) / took:.0f}/s from one address: "
          f"{refused} refused with 429")
    assert statuses == [201] * len(statuses), f"{refused} refused with 429"
