"""The status page's picture (`status_view`) and files, in process: what it names as where a
model runs, and its links when the proxy is mounted under a prefix. (The page itself, in a
browser, is tests/test_status_page.py: its Playwright fixture runs an event loop of its own.)
"""

from __future__ import annotations

import re

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.support import spec
from vllm_chill import ModelSwitchMiddleware, StaticRegistry
from vllm_chill._placement import Capacity, GpuPool, SingleSlot, Slots
from vllm_chill.admin._view import status_view
from vllm_chill.testing import FakeBackend

pytestmark = pytest.mark.anyio


# --- where a model runs, as the page names it -----------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "kind", "placement"),
    [
        (SingleSlot(), "single", []),  # one model at a time, on one machine: nothing to show
        (SingleSlot("vllm"), "deployments", ["vllm"]),  # the one Deployment, by name
        (GpuPool(("0", "1")), "gpus", ["0"]),
        (Slots({"vllm-1gpu": 1, "vllm-2gpu": 2}), "deployments", ["vllm-1gpu"]),
    ],
)
async def test_the_picture_names_where_a_model_runs(
    capacity: Capacity, kind: str, placement: list[str]
) -> None:
    backend = FakeBackend(capacity=capacity)
    proxy = ModelSwitchMiddleware(registry=StaticRegistry([spec("a")]), backend=backend)
    async with proxy.running():
        proxy.switcher.request_switch("a")
        with anyio.fail_after(5):
            while proxy.switcher.state_of("a").value != "loaded":
                await anyio.sleep(0.01)
        picture = status_view(proxy.switcher, proxy.registry)
    assert picture["capacity"] == kind
    [model] = picture["models"]
    assert model["placement"] == placement and model["state"] == "loaded"
    assert picture["switches"][0]["to"] == "a" and picture["switches"][0]["result"] == "success"


async def test_mounted_under_a_prefix_the_page_links_to_its_files_there() -> None:
    proxy = ModelSwitchMiddleware(registry=StaticRegistry([spec("a")]), backend=FakeBackend())
    host = Starlette(routes=[Mount("/llm", app=proxy)])
    transport = httpx.ASGITransport(app=host)
    async with proxy.running(), httpx.AsyncClient(transport=transport, base_url="http://h") as c:
        page = await c.get("/llm/proxy/ui")
        assert page.status_code == 200
        links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
        assert links and all(link.startswith("/llm/proxy/ui/") for link in links)
        assert 'data-ui="/llm/proxy/ui"' in page.text  # where the page finds /proxy/events
        for link in links:
            assert (await c.get(link)).status_code == 200
