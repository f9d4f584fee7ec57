"""The load test's client, run as a process of its own (so that its work does not count in
the proxy's event-loop stall, and the proxy process's descriptors are the proxy's own).

    python tests/reliability/loadgen.py URL --models a,b,c --clients 300 --seconds 20

Each client loops until the time is up: a chat completion for a random model, streamed one
time in three; a 503 is followed by a short random pause (not the Retry-After: the point is to
keep the proxy busy). Every answer is classified; one JSON object on stdout says how many of
each, with latencies. aiohttp, not httpx: httpcore's pool is quadratic in concurrent requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

ALLOWED_503 = {"model_switching_in_progress", "too_many_waiting", "model_switch_failed"}


def well_formed_503(headers: Any, body: bytes) -> str | None:
    """The 503's error code if it is one the proxy may answer, in OpenAI's shape."""
    try:
        error = json.loads(body)["error"]
        retry = int(headers["Retry-After"])
    except (ValueError, KeyError, TypeError):
        return None
    if retry < 1 or not all(isinstance(error.get(k), str) for k in ("message", "type", "code")):
        return None
    return error["code"] if error["code"] in ALLOWED_503 else None


async def one(http: aiohttp.ClientSession, url: str, model: str, stream: bool) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if stream:
        body["stream"] = True
    async with http.post(url + "/v1/chat/completions", json=body) as response:
        data = await response.read()
        if response.status == 503:
            code = well_formed_503(response.headers, data)
            return f"503 {code}" if code else f"bad 503 {data[:200]!r}"
        if response.status == 502 and b'"upstream_unavailable"' in data:
            return "502 upstream_unavailable"  # documented, counted apart (see test_load.py)
        if response.status != 200:
            return f"bad {response.status} {data[:200]!r}"
        if stream:
            ok = data.rstrip().endswith(b"data: [DONE]") and f'"model":"{model}"'.encode() in data
        else:
            ok = json.loads(data).get("model") == model
        return "200" if ok else f"bad 200 {data[:200]!r}"


async def client(
    http: aiohttp.ClientSession,
    url: str,
    models: list[str],
    until: float,
    outcomes: Counter[str],
    latencies: list[float],
) -> None:
    rng = random.Random()
    while time.monotonic() < until:
        model = rng.choice(models)
        started = time.monotonic()
        try:
            outcome = await one(http, url, model, stream=rng.random() < 1 / 3)
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = f"bad {type(exc).__name__}: {exc}"
        outcomes[outcome] += 1
        if outcome == "200":
            latencies.append(time.monotonic() - started)
        elif outcome.startswith("503"):
            await asyncio.sleep(rng.uniform(0.05, 0.3))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--models", required=True)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    models = args.models.split(",")
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    until = time.monotonic() + args.seconds
    timeout = aiohttp.ClientTimeout(total=args.seconds + 30)
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        print(json.dumps({"started": True}), flush=True)
        await asyncio.gather(
            *(
                client(http, args.url, models, until, outcomes, latencies)
                for _ in range(args.clients)
            )
        )
    latencies.sort()

    def quantile(q: float) -> float | None:
        return round(latencies[int(q * (len(latencies) - 1))], 4) if latencies else None

    bad = {k: v for k, v in outcomes.items() if k.startswith("bad")}
    print(
        json.dumps(
            {
                "requests": sum(outcomes.values()),
                "outcomes": {k: v for k, v in outcomes.items() if not k.startswith("bad")},
                "bad": dict(list(bad.items())[:20]),
                "bad_total": sum(bad.values()),
                "latency_200_p50": quantile(0.5),
                "latency_200_p99": quantile(0.99),
                "latency_200_max": quantile(1.0),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
