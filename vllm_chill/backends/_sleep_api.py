"""vLLM's sleep API, as the backends that can put a model to sleep call it.

`POST /sleep?level=1|2&mode=abort|wait|keep`, `POST /wake_up`, `GET /is_sleeping`. The routes
exist only in vLLM's development mode (`VLLM_SERVER_DEV_MODE=1`), and `mode` defaults to
`abort`, which kills the requests in flight: we always send `mode=wait`.
"""

from __future__ import annotations

import httpx

from vllm_chill.backends._base import LoadError


async def post_sleep(client: httpx.AsyncClient, level: int) -> None:
    answer = await client.post("/sleep", params={"level": level, "mode": "wait"})
    if answer.status_code != 200:
        raise LoadError(f"/sleep answered {answer.status_code}: {answer.text[:200]}")


async def post_wake(client: httpx.AsyncClient) -> None:
    answer = await client.post("/wake_up")
    if answer.status_code != 200:
        raise LoadError(f"/wake_up answered {answer.status_code}: {answer.text[:200]}")


async def is_sleeping(client: httpx.AsyncClient) -> bool:
    answer = await client.get("/is_sleeping")
    if answer.status_code == 404:
        raise LoadError("the server has no /is_sleeping: not in vLLM's development mode")
    return bool(answer.json().get("is_sleeping"))
