"""Plays the proxy for `test_local_orphans`: loads a stand-in model with the local backend
(a grandchild and SIGTERM ignored: the hardest case), prints the stand-in's pids as one JSON
line, then waits to be killed. It never calls `stop()`: the point is what happens when the
proxy dies without cleaning up.

Usage: orphan_driver.py asyncio|uvloop COMMAND_TEMPLATE
"""

from __future__ import annotations

import json
import sys

import anyio
import httpx

from vllm_chill._model import VLLMModel
from vllm_chill.backends.local._backend import LocalProcessBackend


async def main(command: str) -> None:
    backend = LocalProcessBackend(command, grace_period=1.0)
    async with backend.session(lambda reason, model=None: None):
        await serve_one(backend)


async def serve_one(backend: LocalProcessBackend) -> None:
    model = VLLMModel.from_spec(
        {
            "modelName": "org/orphan",
            "servedModelName": "orphan",
            "extraArgs": ["--standin-spawn-child", "--standin-ignore-sigterm"],
        }
    )
    loaded = await backend.load(model, lambda phase: None)
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"{loaded.base_url}/v1/models")
    print(json.dumps(response.json()["standin"]), flush=True)
    await anyio.sleep_forever()


if __name__ == "__main__":
    loop, command = sys.argv[1], sys.argv[2]
    anyio.run(main, command, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})
