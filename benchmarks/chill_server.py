"""vllm-chill as the benchmark runs it: one process, the middleware alone (no inner app), a
static registry of one model that the fake backend reports as already loaded, so that every
request takes the proxy's fast path to the upstream. uvicorn runs as `vllm-chill serve` runs
it (uvloop, httptools, no server header) with the access log off.

    python benchmarks/chill_server.py --port 8001 --upstream http://127.0.0.1:8000

`--client aiohttp` or `--client httpx` hands the middleware the upstream transport kept in
`benchmarks/aiohttp_upstream.py` or `benchmarks/httpx_upstream.py` instead of its own client,
to compare them under the same load. `--tree DIR` imports `vllm_chill` from another source tree
(say `git archive <rev> vllm_chill | tar -x -C DIR`), to measure a baseline in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import uvicorn

HERE = Path(__file__).resolve().parent
CLIENTS = ("native", "aiohttp", "httpx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the model server")
    parser.add_argument("--model", default="bench-model", help="served model name")
    parser.add_argument("--client", choices=CLIENTS, default="native")
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="where vllm_chill is")
    args = parser.parse_args()
    sys.path[:0] = [str(args.tree.resolve()), str(HERE)]

    # Imported here, after the source tree is chosen.
    from vllm_chill import (  # noqa: PLC0415
        FakeBackend,
        ModelSwitchMiddleware,
        StaticRegistry,
        VLLMModel,
    )

    transport: Any = None  # vllm-chill's own client
    if args.client == "aiohttp":
        from aiohttp_upstream import AiohttpUpstreamClient  # noqa: PLC0415

        transport = AiohttpUpstreamClient()
    elif args.client == "httpx":
        from httpx_upstream import HttpxUpstreamClient  # noqa: PLC0415

        transport = HttpxUpstreamClient()

    model = VLLMModel.from_spec({"modelName": f"org/{args.model}", "servedModelName": args.model})
    parts: dict[str, Any] = {
        "registry": StaticRegistry([model]),
        "backend": FakeBackend(base_url=args.upstream, preloaded=args.model),
        "transport": transport,
    }
    app = ModelSwitchMiddleware(**parts, **never_idle())
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        backlog=4096,
    )


def never_idle() -> dict[str, Any]:
    """The keyword that keeps the model loaded during a benchmark, in this tree's words (a
    `--tree` from before the settings object took it as a plain keyword)."""
    try:
        from vllm_chill.settings import Settings, SwitchingSettings  # noqa: PLC0415
    except ImportError:
        return {"idle_timeout": 0}
    return {"settings": Settings(switching=SwitchingSettings(idle_timeout=0))}


if __name__ == "__main__":
    main()
