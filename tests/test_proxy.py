"""ModelSwitchMiddleware end to end: a real uvicorn server on loopback, real simulated vLLM
upstreams, the official `openai` client. The backend is the in-process FakeBackend so that
load times and failures are set per test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import httpx
import openai
import pytest

from tests.configs import make_settings
from tests.reliability.helpers import proxy_stack
from tests.servers import serve
from tests.support import chat, spec
from vllm_chill import FakeBackend, ModelSwitchMiddleware, StaticRegistry
from vllm_chill.backends.sim._backend import SimBackend
from vllm_chill.backends.sim._server import SimModelServer

pytestmark = pytest.mark.anyio

MODELS = ["alpha", "beta", "gamma"]


@dataclass
class Stack:
    url: str
    backend: FakeBackend
    proxy: ModelSwitchMiddleware
    sims: dict[str, SimModelServer]
    http: httpx.AsyncClient
    clients: list[openai.AsyncOpenAI]

    def openai(self, **kw: Any) -> openai.AsyncOpenAI:
        """An official client (closed with the stack) that retries 503s as users' would."""
        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 20)
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", **kw)
        self.clients.append(client)
        return client

    async def status(self) -> dict[str, Any]:
        token = self.proxy.settings.security.admin_token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        status: dict[str, Any] = (
            await self.http.get(self.url + "/proxy/status", headers=headers)
        ).json()
        return status

    async def wait_for(self, predicate: Any, timeout: float = 10) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                status = await self.status()
                if predicate(status):
                    return status
                await anyio.sleep(0.02)


@asynccontextmanager
async def stack(
    *,
    load_time: float = 0.0,
    failures: dict[str, str] | None = None,
    tokens_per_second: float = 0.0,
    **options: Any,
) -> AsyncIterator[Stack]:
    options.setdefault("min_residency", 0.0)
    async with AsyncExitStack() as stack:
        sims = {}
        for name in MODELS:
            sim = SimModelServer(name, load_time=0, tokens_per_second=tokens_per_second)
            await stack.enter_async_context(sim)
            sims[name] = sim
        backend = FakeBackend(
            load_time=load_time,
            failures=failures or {},
            base_urls={name: sim.base_url for name, sim in sims.items()},
        )
        proxy = ModelSwitchMiddleware(
            registry=StaticRegistry(spec(m) for m in MODELS),
            backend=backend,
            settings=make_settings(**options),
        )
        url = await stack.enter_async_context(serve(proxy))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        clients: list[openai.AsyncOpenAI] = []
        try:
            yield Stack(url, backend, proxy, sims, http, clients)
        finally:
            for client in clients:
                await client.close()


# --- a newcomer's experience ------------------------------------------------------------------


async def test_first_request_gets_the_loading_503_then_the_openai_client_succeeds() -> None:
    async with stack(load_time=0.3) as s:
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("beta"))
        assert r.status_code == 503
        assert r.headers["retry-after"] == "30"  # nothing measured yet
        error = r.json()["error"]
        assert error["message"] == (
            "Model 'beta' is currently loading. Please wait and retry in a few moments."
        )
        assert error["type"] == "model_loading"
        assert error["code"] == "model_switching_in_progress"
        assert error["model"] == "beta"
        await s.wait_for(lambda st: st["phase"] == "ready")
        # Unload; the next load's Retry-After comes from the measured 0.3s, so the official
        # client (which honours Retry-After) retries within a second or two and succeeds.
        assert (await s.http.post(s.url + "/proxy/unload")).status_code == 202
        await s.wait_for(lambda st: st["phase"] == "idle")
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("beta"))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        client = s.openai()
        answer = await client.chat.completions.create(**chat("beta"))
        assert answer.model == "beta"
        assert answer.choices[0].message.content
        assert s.backend.loads == ["beta", "beta"]


async def test_every_model_answers_in_turn_streaming_and_not() -> None:
    async with stack(load_time=0.05, max_wait=10) as s:
        client = s.openai()
        for name in MODELS:
            answer = await client.chat.completions.create(**chat(name))
            assert answer.model == name
            stream = await client.chat.completions.create(**chat(name), stream=True)
            chunks = [chunk async for chunk in stream]
            assert chunks and all(c.model == name for c in chunks)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text
            completion = await client.completions.create(model=name, prompt="x", max_tokens=3)
            assert completion.model == name
        assert s.backend.loads == MODELS


async def test_unknown_model_is_not_found_for_the_openai_client() -> None:
    async with stack() as s:
        with pytest.raises(openai.NotFoundError) as info:
            await s.openai().chat.completions.create(**chat("nope"))
        assert info.value.code == "model_not_found"
        r = await s.http.get(s.url + "/v1/models/nope")
        assert r.status_code == 404


async def test_models_list_reports_every_model_with_its_state() -> None:
    async with stack(max_wait=5) as s:
        await s.openai().chat.completions.create(**chat("alpha"))
        listed = await s.openai().models.list()
        states = {m.id: m.model_extra["state"] for m in listed.data}  # type: ignore[index]
        assert states == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
        one = await s.http.get(s.url + "/v1/models/alpha")
        assert one.json()["state"] == "loaded"


async def test_held_requests_wait_for_the_load_instead_of_503() -> None:
    async with stack(load_time=0.3, max_wait=10) as s:
        results: list[int] = []

        async def one() -> None:
            r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
            results.append(r.status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert results == [200] * 20
        assert s.backend.loads == ["alpha"]  # one load, joined by all


async def test_hold_ends_in_503_with_retry_after_when_max_wait_passes() -> None:
    async with stack(load_time=5, max_wait=0.2) as s:
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "model_switching_in_progress"
        status = await s.status()
        assert status["requests_waiting"] == {}  # forgotten at once


async def test_streaming_is_relayed_chunk_by_chunk() -> None:
    async with stack(max_wait=5, tokens_per_second=20) as s:
        arrivals: list[float] = []
        async with s.http.stream(
            "POST", s.url + "/v1/chat/completions", json=chat("alpha", stream=True, max_tokens=10)
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for _ in r.aiter_lines():
                arrivals.append(anyio.current_time())
        # ten tokens at 20/s take ~0.5s: the first event must come long before the last.
        assert arrivals[-1] - arrivals[0] > 0.3


async def test_client_disconnect_cancels_the_upstream_request() -> None:
    async with stack(max_wait=5, tokens_per_second=5) as s:
        sim = s.sims["alpha"]
        async with s.http.stream(
            "POST", s.url + "/v1/chat/completions", json=chat("alpha", stream=True, max_tokens=500)
        ) as r:
            async for _ in r.aiter_lines():
                break  # leave after the first event
        with anyio.fail_after(5):
            await sim.stats.wait_until(lambda st: st.disconnected == 1 and st.in_flight == 0)
        status = await s.wait_for(lambda st: st["requests_in_flight"] == {})
        assert status["active_model"] == "alpha"


async def test_failed_load_is_reported_at_once_and_not_retried_in_a_loop() -> None:
    reason = "Back-off restarting failed container (CrashLoopBackOff)"
    async with stack(load_time=0.05, max_wait=10, failures={"gamma": reason}) as s:
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("gamma"))
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "model_switch_failed"
        assert reason in error["message"]
        assert int(r.headers["retry-after"]) >= 1
        for _ in range(5):
            again = await s.http.post(s.url + "/v1/chat/completions", json=chat("gamma"))
            assert again.json()["error"]["code"] == "model_switch_failed"
        assert s.backend.loads == ["gamma"]
        listed = (await s.http.get(s.url + "/v1/models")).json()["data"]
        assert {m["id"]: m["state"] for m in listed}["gamma"] == "failed"
        # The failed load was cleaned up and another model still loads fine.
        ok = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert ok.status_code == 200
        assert ("unload", "gamma") in s.backend.calls


async def test_idle_model_is_unloaded_after_the_idle_timeout() -> None:
    async with stack(max_wait=5, idle_timeout=0.3) as s:
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 200
        status = await s.wait_for(lambda st: st["phase"] == "idle")
        assert status["active_model"] is None
        assert s.backend.calls[-1] == ("unload", "alpha")
        # and a request brings it back
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 200


async def test_long_stream_is_not_cut_by_the_idle_timer() -> None:
    async with stack(max_wait=5, idle_timeout=0.2, tokens_per_second=10) as s:
        async with s.http.stream(
            "POST", s.url + "/v1/chat/completions", json=chat("alpha", stream=True, max_tokens=8)
        ) as r:
            body = b"".join([chunk async for chunk in r.aiter_bytes()])
        assert body.rstrip().endswith(b"data: [DONE]")
        assert s.sims["alpha"].stats.completed == 1


# --- hostile and malformed input ------------------------------------------------------------

MALFORMED: list[tuple[str, dict[str, Any], int, str]] = [
    ("/v1/chat/completions", {"content": b"{not json"}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b"[1, 2]"}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b'{"model": 7}'}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b'{"model": null}'}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b'{"messages": []}'}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b"\xff\xfe\x00garbage"}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b"[" * 100_000}, 400, "invalid_request"),
    ("/v1/chat/completions", {"content": b""}, 400, "invalid_request"),
    (
        "/v1/chat/completions",
        {"content": json.dumps({"model": "x" * 100_000}).encode()},
        400,
        "invalid_request",
    ),
    (
        "/v1/chat/completions",
        {"content": json.dumps(chat("a;rm -rf /")).encode()},
        404,
        "model_not_found",
    ),
    (
        "/v1/audio/transcriptions",
        {
            "content": b"--zz\r\nbroken",
            "headers": {"content-type": "multipart/form-data; boundary=zz"},
        },
        400,
        "invalid_request",
    ),
    (
        "/v1/audio/transcriptions",
        {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
        400,
        "invalid_request",
    ),
    ("/sleep", {"content": json.dumps(chat("alpha")).encode()}, 404, "not_found"),
    ("/v1/load_lora_adapter", {"content": json.dumps(chat("alpha")).encode()}, 404, "not_found"),
    ("/v1/../sleep", {"content": json.dumps(chat("alpha")).encode()}, 404, "not_found"),
    ("/collective_rpc", {"content": b"{}"}, 404, "not_found"),
    ("/v1/unknown", {"content": b"{}"}, 404, "not_found"),
]


async def test_malformed_requests_get_openai_shaped_4xx_and_the_server_stays_up() -> None:
    async with stack(max_wait=5, max_body_size=1024 * 1024) as s:
        for path, kwargs, status, code in MALFORMED:
            r = await s.http.post(s.url + path, **kwargs)
            assert r.status_code == status, (path, kwargs, r.text)
            error = r.json()["error"]
            assert error["code"] == code, (path, r.text)
            assert set(error) >= {"message", "type", "code"}
        huge = await s.http.post(s.url + "/v1/chat/completions", content=b"x" * (1024 * 1024 + 1))
        assert huge.status_code == 413
        assert huge.json()["error"]["code"] == "request_too_large"
        assert (await s.http.get(s.url + "/health")).text == "OK"
        # nothing reached an upstream, nothing was loaded
        assert s.backend.loads == []


async def test_multipart_audio_request_is_routed_by_its_model_field() -> None:
    async with stack(max_wait=5) as s:
        client = s.openai()
        text = await client.audio.transcriptions.create(
            model="beta", file=("a.wav", b"RIFF....WAVE", "audio/wav")
        )
        assert text.text
        assert s.backend.loads == ["beta"]
        seen = s.sims["beta"].stats.history[-1]
        assert seen.path == "/v1/audio/transcriptions"
        assert b"RIFF....WAVE" in seen.body  # forwarded byte for byte


# --- keys and admin -------------------------------------------------------------------------


async def test_api_keys_are_required_and_never_forwarded_upstream() -> None:
    async with stack(max_wait=5, api_keys=("k1", "k2"), upstream_api_key="upkey") as s:
        with pytest.raises(openai.AuthenticationError):
            await s.openai(api_key="wrong").chat.completions.create(**chat("alpha"))
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        answer = await s.openai(api_key="k2").chat.completions.create(**chat("alpha"))
        assert answer.model == "alpha"
        seen = s.sims["alpha"].stats.history[-1]
        assert seen.header("authorization") == "Bearer upkey"
        assert (await s.http.get(s.url + "/health")).status_code == 200  # open


async def test_admin_endpoints() -> None:
    async with stack(load_time=0.1, admin_token="adm") as s:
        headers = {"authorization": "Bearer adm"}
        assert (await s.http.get(s.url + "/proxy/status")).status_code == 401
        r = await s.http.post(
            s.url + "/proxy/models/switch", json={"model": "beta"}, headers=headers
        )
        assert r.status_code == 202 and r.json()["state"] == "loading"
        status = await s.wait_for(lambda st: st["phase"] == "ready")
        assert status["active_model"] == "beta"
        assert status["last_switch"]["to"] == "beta"
        assert status["last_switch"]["result"] == "success"
        r = await s.http.post(
            s.url + "/proxy/models/switch", json={"model": "beta"}, headers=headers
        )
        assert r.status_code == 200
        r = await s.http.post(
            s.url + "/proxy/models/switch", json={"model": "zzz"}, headers=headers
        )
        assert r.status_code == 404
        models = (await s.http.get(s.url + "/proxy/models", headers=headers)).json()["data"]
        assert {m["id"]: m["state"] for m in models}["beta"] == "loaded"
        assert models[0]["spec"]["modelName"] == "org/alpha"
        r = await s.http.post(s.url + "/proxy/unload", headers=headers)
        assert r.status_code == 202
        await s.wait_for(lambda st: st["phase"] == "idle")
        assert s.backend.calls[-1] == ("unload", "beta")


async def test_metrics_count_requests_and_switches() -> None:
    async with stack(max_wait=5) as s:
        await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        await s.http.post(s.url + "/v1/chat/completions", json=chat("beta"))
        text = (await s.http.get(s.url + "/metrics")).text
        assert 'vllm_chill_requests_total{model="alpha",status="200"} 1.0' in text
        assert (
            'vllm_chill_model_switches_total{from_model="alpha",kind="cold",result="success",'
            'to_model="beta"}' in text
        )
        assert 'vllm_chill_active_model{model="beta"} 1.0' in text


async def test_metrics_say_why_vllm_chill_answered_a_request_itself() -> None:
    async with stack(max_wait=0) as s:
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 503
        text = (await s.http.get(s.url + "/metrics")).text
        assert (
            'vllm_chill_refusals_total{code="model_switching_in_progress",model="alpha"} 1.0'
            in text
        )
        assert 'vllm_chill_requests_total{model="alpha",status="503"} 1.0' in text


# --- load and races -------------------------------------------------------------------------


async def test_burst_over_several_models_gets_only_answers_or_well_formed_503s() -> None:
    # Held up to 2 s: on a busy 2-core CI machine, 300 connections take a while just to be
    # accepted, and a shorter hold can see every request time out before the first load ends.
    async with stack(load_time=0.05, max_wait=2.0, max_waiting=150) as s:
        statuses: dict[int, int] = {}
        # aiohttp as the load client: httpcore's pool is quadratic in concurrent requests.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as http:

            async def one(i: int) -> None:
                url = s.url + "/v1/chat/completions"
                async with http.post(url, json=chat(MODELS[i % 3])) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    body = await r.json()
                    if r.status == 503:
                        assert int(r.headers["retry-after"]) >= 1
                        assert body["error"]["code"] in (
                            "model_switching_in_progress",
                            "too_many_waiting",
                        )
                    else:
                        assert r.status == 200
                        assert body["model"] == MODELS[i % 3]

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(300):
                        tg.start_soon(one, i)
        assert sum(statuses.values()) == 300
        assert statuses.get(200, 0) > 0
        status = await s.wait_for(lambda st: not st["requests_in_flight"])
        assert status["requests_waiting"] == {}


async def test_race_between_idle_unload_switch_and_arrivals() -> None:
    """Idle unloads, switches and requests interleave; nothing hangs, nothing is lost."""
    async with stack(load_time=0.01, max_wait=5, idle_timeout=0.05) as s:
        done = 0

        async def client(name: str) -> None:
            nonlocal done
            for i in range(15):
                r = await s.http.post(s.url + "/v1/chat/completions", json=chat(name))
                assert r.status_code == 200, r.text
                assert r.json()["model"] == name
                done += 1
                await anyio.sleep(0.07 if i % 2 else 0)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for name in ("alpha", "beta", "alpha"):
                    tg.start_soon(client, name)
        assert done == 45
        status = await s.wait_for(lambda st: st["phase"] == "idle")
        assert status["requests_in_flight"] == {}


async def test_lost_model_is_reloaded_by_the_next_request() -> None:
    async with stack(max_wait=5) as s:
        assert (await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))).is_success
        s.backend.lose("process exited")
        await s.wait_for(lambda st: st["phase"] == "idle")
        assert (await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))).is_success
        assert s.backend.loads == ["alpha", "alpha"]


async def test_unreachable_upstream_is_a_502() -> None:
    async with stack(max_wait=5) as s:
        await s.sims["alpha"].stop()
        r = await s.http.post(s.url + "/v1/chat/completions", json=chat("alpha"))
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unavailable"


async def test_v2_embed_is_routed_by_its_model() -> None:
    async with stack(max_wait=5) as s:
        r = await s.http.post(s.url + "/v2/embed", json={"model": "beta", "texts": ["hi"]})
        assert s.backend.loads == ["beta"]
        # The simulator has no such route: its own 404 shows the request reached it.
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


async def test_stored_responses_go_to_the_model_being_served() -> None:
    async with stack(max_wait=5) as s:
        none_yet = await s.http.get(s.url + "/v1/responses/resp_1")
        assert none_yet.status_code == 404 and none_yet.json()["error"]["code"] == "not_found"
        assert (await s.http.post(s.url + "/v1/chat/completions", json=chat("gamma"))).is_success
        # The simulator stores no responses: its own 404s show the requests reached gamma.
        for r in (
            await s.http.get(s.url + "/v1/responses/resp_1"),
            await s.http.post(s.url + "/v1/responses/resp_1/cancel"),
        ):
            assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        assert s.backend.loads == ["gamma"]  # nothing else was loaded for them


async def test_a_websocket_is_refused_cleanly() -> None:
    """vLLM's `/v1/realtime` is a websocket: refused with a close (the server answers the
    handshake 403), not an error."""
    proxy = ModelSwitchMiddleware(registry=StaticRegistry([spec("alpha")]), backend=FakeBackend())
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "headers": [], "query_string": b""}
    await proxy(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.close"]


async def test_a_loaded_models_entry_is_the_servers_own() -> None:
    """`max_model_len` as the server reports it (the spec leaves it to vLLM here), with the
    server's other fields; before the load, what the spec says."""
    async with (
        proxy_stack(models=[spec("alpha")], backend=SimBackend(load_time=0), max_wait=5) as st,
        httpx.AsyncClient(timeout=30) as http,
    ):
        before = (await http.get(st.url + "/v1/models/alpha")).json()
        assert before["state"] == "unloaded" and before["max_model_len"] is None
        assert (await http.post(st.url + "/v1/chat/completions", json=chat("alpha"))).is_success
        after = (await http.get(st.url + "/v1/models/alpha")).json()
        assert after["state"] == "loaded"
        assert after["max_model_len"] == 8192  # the simulator's default, as vLLM derives its own
        assert after["root"] == "org/alpha" and after["owned_by"] == "vllm"
