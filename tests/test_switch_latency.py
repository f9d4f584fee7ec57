"""What a single user feels: each switch costs the load and nothing more.

One user asks for alpha, gets it, then asks for beta, then alpha again, on real loopback
servers: the simulator, and the local backend running real child processes. Each switch — from
the first request for the new model to its first answer — may cost what the backend itself
spends (stopping the old server, starting the new one, as the proxy measured them) plus at most
one second, whether the client is held (`max_wait`) or polls after 503s. On the simulator the
backend spends exactly the load time; a real child process also pays its own start-up.
"""

from __future__ import annotations

import time

import anyio
import httpx
import openai
import pytest

from tests.local.local_helpers import make_model, standin_command
from tests.reliability.helpers import proxy_stack
from tests.support import spec
from vllm_chill._model import VLLMModel
from vllm_chill.backends._base import Backend
from vllm_chill.backends.local._backend import LocalProcessBackend
from vllm_chill.backends.sim._backend import SimBackend

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LOAD = 1.0


def stack_parts(kind: str) -> tuple[Backend, list[VLLMModel]]:
    if kind == "sim":
        return SimBackend(load_time=LOAD, tokens_per_second=0), [spec("alpha"), spec("beta")]
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    return backend, [make_model(m, load_time=LOAD) for m in ("alpha", "beta")]


async def first_answer(http: httpx.AsyncClient, url: str, model: str) -> float:
    """Seconds from the first request for `model` to its first 200, retrying 503s quickly
    (a user pressing enter again, or a held request that needs no retry)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    started = time.monotonic()
    with anyio.fail_after(30):
        while True:
            r = await http.post(url + "/v1/chat/completions", json=body)
            if r.status_code == 200:
                assert r.json()["model"] == model
                return time.monotonic() - started
            assert r.status_code == 503, r.text
            await anyio.sleep(0.1)


@pytest.mark.parametrize("max_wait", [0.0, 30.0], ids=["polling", "held"])
@pytest.mark.parametrize("kind", ["sim", "local"])
async def test_a_single_user_switches_at_load_speed(kind: str, max_wait: float) -> None:
    backend, models = stack_parts(kind)
    async with (
        proxy_stack(models=models, backend=backend, max_wait=max_wait, min_residency=5.0) as st,
        httpx.AsyncClient(timeout=40) as http,
    ):
        await first_answer(http, st.url, "alpha")  # the first load: nothing to switch from
        core = st.proxy.switcher.core
        for model in ("beta", "alpha", "beta"):
            took = await first_answer(http, st.url, model)
            spent = core.durations[model][-1]  # the backend's switch: old out, new in
            assert spent >= LOAD, (kind, model, spent)
            if kind == "sim":
                assert spent <= LOAD + 0.5, (kind, model, spent)  # its /health polling
            assert took - spent <= 1.0, (kind, model, took, spent)


async def test_the_openai_client_with_four_retries_outlasts_a_first_load_past_its_estimate() -> (
    None
):
    """The first load of a model is announced as `--first-load-estimate` (7.5 s here, to keep
    the test short; 30 s by default); this one takes 12.5 s. The official client sleeps each
    Retry-After it is given (8, then 2, then 3 s): they must bring it to the answer within its
    retries, not burn them on "retry in 1 s" once the estimate has passed (8, 9, 10, 11: out of
    retries before the model is ready)."""
    backend = SimBackend(load_time=12.5, tokens_per_second=0)
    async with proxy_stack(models=[spec("alpha")], backend=backend, first_load_estimate=7.5) as st:
        async with openai.AsyncOpenAI(
            base_url=st.url + "/v1", api_key="unused", max_retries=4
        ) as sdk:
            with anyio.fail_after(30):
                answer = await sdk.chat.completions.create(
                    model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
        assert answer.model == "alpha"
