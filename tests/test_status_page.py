"""The status page (`/proxy/ui`) in a real headless Chromium against `vllm-chill serve
--backend sim`, and its event stream (`/proxy/events`) as a script reads it.

The browser is Debian's `chromium`, driven by Playwright. Without it these tests skip,
except in CI (`CI` set), where a missing browser is a failure: `.ci/run` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.processes import REPO, START_TIMEOUT, running
from tests.support import chat

pytestmark = pytest.mark.slow

MODELS = REPO / "manifests" / "examples"
LOAD_TIME = 3.0  # long enough to see a load in progress on a busy machine
#: The issue's bound: a switch made by another client shows within this.
SHOWS_WITHIN = 2.0
TOKEN = "status-page-token-1234"
#: What the page shows in an empty cell (an en dash).
NOTHING = "\u2013"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "no Chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium, one per test: Playwright's sync API keeps an event loop running in
    this thread while it is open, which async tests cannot share."""
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


def serve(*extra: str) -> Any:
    return running(
        [
            *(sys.executable, "-m", "vllm_chill", "serve", "--backend", "sim"),
            *("--models", str(MODELS), "--host", "127.0.0.1", "--port", "0"),
            *("--sim-load-time", f"{LOAD_TIME}s"),
            *extra,
        ]
    )


class Page:
    """A browser tab on the status page that records every request it makes."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 760})
        self.page = self.context.new_page()
        self.requests: list[Any] = []
        # Playwright wants a Python function here, not a builtin method.
        self.page.on("request", lambda request: self.requests.append(request))  # noqa: PLW0108
        self.base = base

    def open(self) -> None:
        self.page.goto(self.base + "/proxy/ui")

    def row(self, model: str) -> Any:
        return self.page.locator(f'#models tr[data-model="{model}"]')

    def wait_state(self, model: str, state: str, timeout: float) -> None:
        self.page.wait_for_selector(
            f'#models tr[data-model="{model}"][data-state="{state}"]', timeout=timeout * 1000
        )

    def close(self) -> None:
        self.context.close()


def test_the_page_shows_a_switch_as_it_happens_and_its_buttons_work(browser: Any) -> None:
    with serve() as process:
        base = process.base_url()
        tab = Page(browser, base)
        try:
            tab.open()
            tab.page.wait_for_selector('#connection[data-state="live"]', timeout=10_000)
            assert tab.page.locator("#models tbody tr").count() == 3
            for model in ("qwen3-coder-30b-fp8", "deepseek-r1-fp8", "llama-3.1-8b-instruct"):
                tab.wait_state(model, "unloaded", 1)

            # Another client asks for a model: told to come back, and the load starts.
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            asked = time.monotonic()
            with pytest.raises(openai.APIStatusError) as told:
                client.chat.completions.create(**chat("deepseek-r1-fp8"))
            assert told.value.status_code == 503
            switch = tab.page.locator('#switches tr[data-to="deepseek-r1-fp8"]')
            switch.wait_for(timeout=SHOWS_WITHIN * 1000)
            assert time.monotonic() - asked < SHOWS_WITHIN
            assert switch.get_attribute("data-result") == "in_progress"
            assert "loading" in tab.row("deepseek-r1-fp8").inner_text()

            # When it ends, its duration is shown.
            tab.page.wait_for_selector(
                '#switches tr[data-to="deepseek-r1-fp8"][data-result="success"]',
                timeout=(LOAD_TIME + 5) * 1000,
            )
            cells = switch.locator("td").all_inner_texts()
            assert cells[1:4] == [NOTHING, "deepseek-r1-fp8", "cold"]
            shown = float(re.fullmatch(r"([\d.]+) s", cells[4]).group(1))  # type: ignore[union-attr]
            assert LOAD_TIME <= shown < LOAD_TIME + 2
            tab.wait_state("deepseek-r1-fp8", "loaded", 2)
            answer = client.chat.completions.create(**chat("deepseek-r1-fp8", max_tokens=3))
            assert answer.choices[0].message.content

            # The unload button unloads it.
            tab.row("deepseek-r1-fp8").get_by_role("button", name="Unload").click()
            tab.wait_state("deepseek-r1-fp8", "unloaded", 5)
            deadline = time.monotonic() + 5
            while httpx.get(base + "/proxy/status").json()["models"]:  # its server stops
                assert time.monotonic() < deadline
                time.sleep(0.05)

            # The load button loads another.
            tab.row("llama-3.1-8b-instruct").get_by_role("button", name="Load").click()
            tab.wait_state("llama-3.1-8b-instruct", "loaded", LOAD_TIME + 5)
            assert tab.page.locator("#switches tbody tr").count() == 2
            tab.page.locator("#content").screenshot(type="png")  # renders without error
            screenshot = os.environ.get("VLLM_CHILL_SCREENSHOT")
            if screenshot:
                tab.page.screenshot(path=screenshot, full_page=True)

            # Nothing the page asked for left this server.
            urls = [request.url for request in tab.requests]
            assert urls and all(url.startswith(base + "/") for url in urls), urls
        finally:
            tab.close()


def test_with_a_token_the_page_asks_for_it_once_and_sends_it_as_a_bearer(
    browser: Any,
) -> None:
    with serve("--admin-token", TOKEN) as process:
        base = process.base_url()
        tab = Page(browser, base)
        try:
            tab.open()
            login = tab.page.locator("#login")
            login.wait_for(timeout=10_000)
            assert tab.page.locator("#content").is_hidden()

            tab.page.fill("#token", "not-the-token")
            tab.page.click("#login button[type=submit]")
            tab.page.wait_for_selector("#login-error:has-text('not accepted')", timeout=5_000)

            refused = len(tab.requests)
            tab.page.fill("#token", TOKEN)
            tab.page.click("#login button[type=submit]")
            tab.page.wait_for_selector('#connection[data-state="live"]', timeout=5_000)
            tab.wait_state("deepseek-r1-fp8", "unloaded", 1)

            # Kept for the tab's session: a reload does not ask again.
            tab.page.reload()
            tab.page.wait_for_selector('#connection[data-state="live"]', timeout=5_000)
            assert login.is_hidden()

            # Its buttons carry it too.
            tab.row("qwen3-coder-30b-fp8").get_by_role("button", name="Load").click()
            tab.wait_state("qwen3-coder-30b-fp8", "loaded", LOAD_TIME + 5)

            for request in tab.requests:
                assert TOKEN not in request.url
            data_calls = [r for r in tab.requests[refused:] if "/proxy/ui" not in r.url]
            assert data_calls
            for request in data_calls:
                assert request.headers.get("authorization") == f"Bearer {TOKEN}"
            authorized = [r for r in data_calls if r.headers.get("authorization")]
            assert {r.url.rsplit("/", 2)[-1] for r in authorized} >= {"events", "switch"}
            assert TOKEN not in process.log
        finally:
            tab.close()


BROKEN = """
apiVersion: vllm.efortin.github.io/v1alpha1
kind: VLLMModel
metadata:
  name: broken
spec:
  modelName: org/broken
  servedModelName: broken
  extraArgs: ["--sim-fail-load"]
"""


def test_a_failed_load_shows_its_reason_and_when_it_may_be_retried(
    browser: Any, tmp_path: Path
) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    with running(
        [
            *(sys.executable, "-m", "vllm_chill", "serve", "--backend", "sim"),
            *("--models", str(tmp_path), "--host", "127.0.0.1", "--port", "0"),
            *("--sim-load-time", "0.5s", "--failure-backoff", "30s"),
        ]
    ) as process:
        base = process.base_url()
        tab = Page(browser, base)
        try:
            tab.open()
            tab.page.wait_for_selector('#connection[data-state="live"]', timeout=10_000)
            tab.row("broken").get_by_role("button", name="Load").click()
            tab.wait_state("broken", "failed", 10)
            text = tab.row("broken").inner_text()
            reason = httpx.get(base + "/proxy/status").json()["failed_models"]["broken"]["reason"]
            assert reason and reason in text
            assert re.search(r"retry allowed in (\d+) s", text)
            switch = tab.page.locator('#switches tr[data-to="broken"]')
            assert switch.get_attribute("data-result") == "failure"
            assert reason in switch.inner_text()
        finally:
            tab.close()


# --- the event stream and the page's files, without a browser -------------------------------


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """The `(event, data)` pairs of a server-sent event stream, as they come."""
    kind, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield kind, json.loads("\n".join(data))
            kind, data = "message", []


def test_a_script_follows_a_switch_on_the_event_stream() -> None:
    with serve() as process:
        base = process.base_url()
        with (
            httpx.Client(base_url=base, timeout=10) as client,
            client.stream("GET", "/proxy/events") as stream,
        ):
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"] == "no-cache"
            seen = events(stream)
            kind, first = next(seen)
            assert kind == "status"
            assert {m["id"]: m["state"] for m in first["models"]} == {
                "qwen3-coder-30b-fp8": "unloaded",
                "deepseek-r1-fp8": "unloaded",
                "llama-3.1-8b-instruct": "unloaded",
            }
            asked = time.monotonic()
            assert (
                client.post("/v1/chat/completions", json=chat("deepseek-r1-fp8")).status_code == 503
            )
            switches = []
            for kind, data in seen:
                if kind == "switch":
                    switches.append(data)
                    if data["result"] != "in_progress":
                        break
                assert time.monotonic() - asked < START_TIMEOUT
            started, ended = switches
            assert started["to"] == ended["to"] == "deepseek-r1-fp8"
            assert started["number"] == ended["number"] == 1
            assert started["result"] == "in_progress" and ended["result"] == "success"
            assert LOAD_TIME <= ended["duration_seconds"] < LOAD_TIME + 2
            kind, after = next(seen)
            assert kind == "status"
            model = {m["id"]: m for m in after["models"]}["deepseek-r1-fp8"]
            assert model["state"] == "loaded" and model["load_seconds"] == [
                ended["duration_seconds"]
            ]


def test_the_event_stream_shows_requests_in_flight_on_a_loaded_model() -> None:
    """A request to a ready model changes nothing but the counts: they show all the same."""
    with serve("--sim-tokens-per-second", "10") as process:
        base = process.base_url()
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.post("/proxy/models/switch", json={"model": "deepseek-r1-fp8"})
            deadline = time.monotonic() + START_TIMEOUT
            while client.get("/v1/models/deepseek-r1-fp8").json()["state"] != "loaded":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with client.stream("GET", "/proxy/events") as stream:
                seen = events(stream)

                def counts() -> tuple[int, float]:
                    for kind, data in seen:
                        if kind == "status":
                            [model] = [m for m in data["models"] if m["id"] == "deepseek-r1-fp8"]
                            return model["in_flight"], time.monotonic()
                    raise AssertionError("the stream ended")

                assert counts()[0] == 0
                body = chat("deepseek-r1-fp8", max_tokens=40, stream=True)  # ~4 s of tokens
                with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    asked = time.monotonic()
                    assert answer.status_code == 200
                    in_flight, at = counts()
                    assert in_flight == 1 and at - asked < SHOWS_WITHIN
                    answer.read()
                ended = time.monotonic()
                in_flight, at = counts()
                assert in_flight == 0 and at - ended < SHOWS_WITHIN


def test_the_event_stream_needs_the_admin_token_and_the_page_does_not() -> None:
    with serve("--admin-token", TOKEN) as process:
        base = process.base_url()
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/proxy/events").status_code == 401
            page = client.get("/proxy/ui")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "connect-src 'self'" in policy
            # Every file it links to is served from here.
            links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
            assert links and all(link.startswith("/proxy/ui/") for link in links)
            for link in links:
                assert client.get(link).status_code == 200
            assert client.get("/proxy/ui/nothing.js").status_code == 404
            assert client.post("/proxy/ui").status_code == 405
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with client.stream("GET", "/proxy/events", headers=headers) as stream:
                assert stream.status_code == 200
                kind, _ = next(events(stream))
                assert kind == "status"


def test_unload_takes_one_model_or_all() -> None:
    with serve("--gpus", "0,1") as process:
        base = process.base_url()
        with httpx.Client(base_url=base, timeout=10) as client:
            for model in ("deepseek-r1-fp8", "llama-3.1-8b-instruct"):
                assert client.post("/proxy/models/switch", json={"model": model}).status_code == 202
            deadline = time.monotonic() + START_TIMEOUT
            while len(client.get("/proxy/status").json()["models"]) < 2 or any(
                m["phase"] != "ready" for m in client.get("/proxy/status").json()["models"].values()
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            idle = client.post("/proxy/unload", json={"model": "qwen3-coder-30b-fp8"})
            assert idle.status_code == 200
            assert idle.json() == {"status": "not_loaded", "model": "qwen3-coder-30b-fp8"}
            unknown = client.post("/proxy/unload", json={"model": "nope"})
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "model_not_found"
            one = client.post("/proxy/unload", json={"model": "deepseek-r1-fp8"})
            assert one.status_code == 202 and one.json() == {
                "status": "unloading",
                "model": "deepseek-r1-fp8",
            }
            while "deepseek-r1-fp8" in client.get("/proxy/status").json()["models"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert list(client.get("/proxy/status").json()["models"]) == ["llama-3.1-8b-instruct"]
            assert client.post("/proxy/unload").status_code == 202
            while client.get("/proxy/status").json()["models"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_serve_stops_at_once_with_a_status_page_open() -> None:
    with serve() as process:
        stream = httpx.stream("GET", process.base_url() + "/proxy/events", timeout=10)
        with stream as response:
            next(events(response))
            stopping = time.monotonic()
            assert process.terminate() == 0
            assert time.monotonic() - stopping < 5
