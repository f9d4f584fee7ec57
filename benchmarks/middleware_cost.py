"""CPU cost of vllm-chill's own request path, with no network and no HTTP server: the ASGI app
called directly with an in-memory request and a stub upstream client, so that only the
middleware, the switcher and the metrics are measured. Useful to profile them in isolation
(the network benchmark is `run.py`).

    python benchmarks/middleware_cost.py              # µs of CPU per request
    python benchmarks/middleware_cost.py --profile    # and cProfile's top functions
    python benchmarks/middleware_cost.py --tree DIR   # another source tree (a baseline)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

BODY = (
    b'{"messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Write one short sentence about benchmarks."}],'
    b'"model":"bench-model","max_tokens":64,"temperature":0.7,"stream":false}'
)
HEADERS = [
    (b"host", b"127.0.0.1:8001"),
    (b"content-type", b"application/json"),
    (b"authorization", b"Bearer sk-benchmark"),
    (b"content-length", str(len(BODY)).encode()),
]
ANSWER_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"300")]
ANSWER = b"x" * 300


class StubUpstream:
    """Answers every request at once, as a fast upstream would, without a socket."""

    async def forward(self, scope: Any, send: Any, **_: Any) -> int:
        await send({"type": "http.response.start", "status": 200, "headers": ANSWER_HEADERS})
        await send({"type": "http.response.body", "body": ANSWER, "more_body": False})
        return 200

    async def aclose(self) -> None:
        return None


async def one_request(app: Any) -> None:
    """One request as uvicorn delivers it: the body, then `http.disconnect` once the response
    is complete."""
    complete = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": BODY, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": HEADERS,
        "http_version": "1.1",
        "scheme": "http",
    }
    await app(scope, receive, send)


async def measure(requests: int, profile: bool) -> float:
    from chill_server import never_idle  # noqa: PLC0415 - after the tree is chosen

    from vllm_chill import (  # noqa: PLC0415
        FakeBackend,
        ModelSwitchMiddleware,
        StaticRegistry,
        VLLMModel,
    )

    model = VLLMModel.from_spec({"modelName": "org/bench-model", "servedModelName": "bench-model"})
    parts: dict[str, Any] = {
        "registry": StaticRegistry([model]),
        "backend": FakeBackend(preloaded="bench-model"),
        **never_idle(),
    }
    try:
        app = ModelSwitchMiddleware(transport=StubUpstream(), **parts)
        legacy = False
    except TypeError:  # a --tree from before the `transport=` seam
        app = ModelSwitchMiddleware(**parts)
        legacy = True
    async with app.running():
        if legacy:
            app._upstream = StubUpstream()
        for _ in range(requests // 10):  # warm up
            await one_request(app)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        started = time.process_time()
        for _ in range(requests):
            await one_request(app)
        elapsed = time.process_time() - started
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="where vllm_chill is")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    try:
        import uvloop  # noqa: PLC0415

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    cost = run(measure(args.requests, args.profile))
    print(f"{cost:.1f} µs of CPU per request (middleware, switcher, metrics; stub upstream)")


if __name__ == "__main__":
    main()
