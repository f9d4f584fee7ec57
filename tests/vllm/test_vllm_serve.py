"""`vllm-chill serve --backend local` in front of real vLLM servers (the real-vLLM tier).

One proxy serves the whole module, and the tests run in file order on it, so that the loads
(about 20 s each on 2 cores) are shared: tiny-a is loaded by the first test and reused; the
switch test goes A -> B -> A; the idle test waits for A to unload; the failing models need no
model loaded; the last test loads B and SIGKILLs the proxy. Each test still makes sure of the
state it needs, so any one of them also runs alone (`-k`).
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from tests.vllm.vllm_helpers import (
    VLLM_ENV,
    Proxy,
    Tier,
    TreeWatcher,
    alive,
    group_members,
    processes,
    uptime,
)

pytestmark = pytest.mark.vllm

IDLE_TIMEOUT = 12.0
#: A load normally takes ~20 s here; other test suites may share the 2 cores.
LOAD_TIMEOUT = 150.0
SWITCH_TIMEOUT = "4m"
#: A model vLLM refuses must fail as soon as vLLM exits (~10 s of imports), not after
#: SWITCH_TIMEOUT: allow for a loaded machine, nothing close to the timeout.
FAIL_FAST = 60.0
#: How long the process group of a server may take to disappear after the proxy is killed.
GONE_TIMEOUT = 15.0
MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]

BAD_FLAG_LINE = "argument --kv-cache-dtype: invalid choice: 'fp7'"
NOT_A_MODEL_LINE = "Invalid repository ID or local directory specified"

timings: dict[str, float] = {}


def _manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vllm.efortin.github.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name},
        "spec": {"servedModelName": name, **spec},
    }


def _tiny(tier: Tier, name: str, model: str, *extra: str) -> dict[str, Any]:
    return _manifest(
        name,
        modelName=str(tier.model(model)),
        maxModelLen=1024,
        maxNumSeqs=8,
        dtype="float32",
        extraArgs=["--enforce-eager", *extra],
    )


@pytest.fixture(scope="module")
def proxy(tier: Tier, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    root = tmp_path_factory.mktemp("vllm-tier")
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("No config.json here.\n")
    models = root / "models"
    models.mkdir()
    for manifest in (
        _tiny(tier, "tiny-a", "tiny-llama"),
        _tiny(tier, "tiny-b", "tiny-qwen"),
        _tiny(tier, "bad-flag", "tiny-llama", "--kv-cache-dtype", "fp7"),
        _manifest("not-a-model", modelName=str(not_a_model), extraArgs=["--enforce-eager"]),
    ):
        name = manifest["metadata"]["name"]
        (models / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
    command = (
        f"{shlex.quote(str(tier.vllm))} serve {{model}} {{args}} --host 127.0.0.1 --port {{port}}"
    )
    args = ["--backend", "local", "--models", str(models), "--host", "127.0.0.1", "--port", "0"]
    args += ["--command", command, "--idle-timeout", f"{IDLE_TIMEOUT:g}s"]
    args += ["--min-residency", "0", "--model-switch-timeout", SWITCH_TIMEOUT]
    started = time.monotonic()
    server = Proxy(args, VLLM_ENV)
    try:
        yield server
    finally:
        server.stop()
        leftovers = group_members(server.groups)
        for group in {p.pgid for p in leftovers}:
            os.killpg(group, signal.SIGKILL)
        timings["module wall"] = time.monotonic() - started
        print("\nreal-vLLM tier timings (s):", {k: round(v, 1) for k, v in timings.items()})
        assert not leftovers, f"model server processes left after the proxy stopped: {leftovers}"


@pytest.fixture(scope="module")
def sdk(proxy: Proxy) -> Iterator[openai.OpenAI]:
    with openai.DefaultHttpxClient(trust_env=False) as http:
        yield openai.OpenAI(
            base_url=f"{proxy.base_url}/v1", api_key="unused", max_retries=0, http_client=http
        )


def _ensure_loaded(proxy: Proxy, model: str) -> float:
    """Ask for `model` and wait for it; the seconds it took (0 when already loaded)."""
    if proxy.state(model) == "loaded":
        return 0.0
    answer = proxy.chat(model)
    if answer.status_code == 200:
        return 0.0
    assert answer.status_code == 503, answer.text
    state, seconds = proxy.wait_state(model, {"loaded", "failed"}, LOAD_TIMEOUT)
    assert state == "loaded", proxy.log()
    return float(seconds)


def _assert_from_vllm(reply: Any, model: str) -> None:
    """The answer was made by vLLM (not by a stand-in, not by the proxy)."""
    assert reply.model == model
    assert str(reply.system_fingerprint).startswith("vllm-0.32"), reply
    assert reply.id.startswith(("chatcmpl-", "cmpl-"))


def test_first_request_is_503_then_vllm_answers(proxy: Proxy, sdk: openai.OpenAI) -> None:
    if proxy.state("tiny-a") == "loaded":
        pytest.skip("tiny-a is already loaded")
    first = proxy.chat("tiny-a")
    assert first.status_code == 503, first.text
    error = first.json()["error"]
    assert error["type"] == "model_loading"
    assert error["code"] == "model_switching_in_progress"
    assert int(first.headers["retry-after"]) >= 1
    state, seconds = proxy.wait_state("tiny-a", {"loaded", "failed"}, LOAD_TIMEOUT)
    assert state == "loaded", proxy.log()
    timings["first load tiny-a"] = seconds
    proxy.remember_groups()

    reply = sdk.chat.completions.create(
        model="tiny-a", messages=MESSAGES, max_tokens=8, extra_body={"ignore_eos": True}
    )
    _assert_from_vllm(reply, "tiny-a")
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_streaming(proxy: Proxy, sdk: openai.OpenAI) -> None:
    _ensure_loaded(proxy, "tiny-a")
    chunks = list(
        sdk.chat.completions.create(
            model="tiny-a",
            messages=MESSAGES,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta]
    assert sum(1 for d in deltas if d) >= 2, chunks
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert all(c.model == "tiny-a" for c in chunks)
    assert str(chunks[0].system_fingerprint or "vllm-0.32").startswith("vllm-")

    texts = [
        c.choices[0].text
        for c in sdk.completions.create(
            model="tiny-a",
            prompt="Once",
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    ]
    assert sum(1 for t in texts if t) >= 2


def _switch(proxy: Proxy, watcher: TreeWatcher, old: str, new: str, sdk: openai.OpenAI) -> None:
    """Switch from `old` (loaded) to `new`; its whole old tree must be gone before any
    process of the new server starts."""
    tree = proxy.remember_groups()
    old_pids = {p.pid for p in tree}
    assert old_pids, f"no process of {old} under the proxy"
    since = uptime()
    started = time.monotonic()
    refused = proxy.chat(new)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "model_loading"
    # Polled rather than retried on Retry-After, which may round up: the tier's time counts.
    state, _ = proxy.wait_state(new, {"loaded", "failed"}, LOAD_TIMEOUT)
    timings[f"switch {old}->{new}"] = time.monotonic() - started
    assert state == "loaded", proxy.log()
    reply = sdk.chat.completions.create(model=new, messages=MESSAGES, max_tokens=4)
    _assert_from_vllm(reply, new)
    time.sleep(0.1)  # one more sample of the watcher
    last_old = watcher.last_seen(old_pids)
    new_starts = watcher.started_since(new, since)
    assert new_starts, f"no new process of {new} was seen"
    assert last_old is not None
    timings[f"switch {old}->{new}: old tree gone"] = last_old - since
    timings[f"switch {old}->{new}: new server started"] = min(new_starts.values()) - since
    # Start times count in clock ticks (10 ms): allow one tick.
    assert min(new_starts.values()) >= last_old - 0.011, (last_old, new_starts)
    alive = {p.pid for p in proxy.remember_groups()}
    assert not alive & old_pids, f"processes of {old} still alive: {alive & old_pids}"


def test_switch_a_b_a_old_tree_gone_first(proxy: Proxy, sdk: openai.OpenAI) -> None:
    _ensure_loaded(proxy, "tiny-a")
    with TreeWatcher(proxy.pid) as watcher:
        _switch(proxy, watcher, "tiny-a", "tiny-b", sdk)
        _switch(proxy, watcher, "tiny-b", "tiny-a", sdk)
    assert not watcher.overlaps(), watcher.overlaps()[:3]
    assert len(watcher.samples) > 100


def test_idle_unload(proxy: Proxy) -> None:
    _ensure_loaded(proxy, "tiny-a")
    assert proxy.remember_groups()
    _, seconds = proxy.wait_state("tiny-a", {"unloaded"}, IDLE_TIMEOUT + 30)
    timings["idle unload after last check"] = seconds
    assert seconds <= IDLE_TIMEOUT + 15
    deadline = time.monotonic() + GONE_TIMEOUT
    while proxy.remember_groups() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not proxy.remember_groups(), "a model server is still running after the idle unload"
    assert not group_members(proxy.groups)


@pytest.mark.parametrize(
    ("model", "line"),
    [("bad-flag", BAD_FLAG_LINE), ("not-a-model", NOT_A_MODEL_LINE)],
    ids=["bad-flag", "not-a-model"],
)
def test_refused_model_fails_fast_with_vllm_s_line(proxy: Proxy, model: str, line: str) -> None:
    started = time.monotonic()
    first = proxy.chat(model)
    assert first.status_code == 503, first.text
    state, _ = proxy.wait_state(model, {"failed", "loaded"}, FAIL_FAST)
    timings[f"failed load {model}"] = time.monotonic() - started
    assert state == "failed", proxy.log()
    answer = proxy.chat(model)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_switch_failed", error
    assert line in error["message"], error["message"]
    assert int(answer.headers["retry-after"]) >= 1
    assert not proxy.remember_groups(), "the refused server left processes"


def test_sigkill_of_the_proxy_leaves_no_vllm_process(proxy: Proxy) -> None:
    timings["load tiny-b"] = _ensure_loaded(proxy, "tiny-b")
    tree = proxy.remember_groups()
    assert len(tree) >= 3, tree  # supervisor, API server, EngineCore (and its worker)
    pids = {p.pid for p in tree}
    groups = set(proxy.groups)
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.popen.wait(timeout=10)
    killed = time.monotonic()
    while time.monotonic() - killed < GONE_TIMEOUT:
        left = [p for p in processes().values() if alive(p) and (p.pid in pids or p.pgid in groups)]
        if not left:
            break
        time.sleep(0.05)
    timings["tree gone after SIGKILL"] = time.monotonic() - killed
    assert not left, f"alive {GONE_TIMEOUT:.0f} s after the proxy was SIGKILLed: {left}"
