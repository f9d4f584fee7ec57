"""LocalProcessBackend with real child processes (the stand-in server), end to end.

Every test also checks, through the `tracker` fixture, that no process it started is left."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import openai
import pytest

from tests.local.local_helpers import LostRecorder, Tracker, make_model, standin_command
from vllm_chill.backends._base import Backend, LoadedModel, LoadError
from vllm_chill.backends.local._backend import LocalProcessBackend

pytestmark = pytest.mark.anyio


async def chat(loaded: LoadedModel, *, stream: bool = False) -> str:
    """Ask the loaded model through the official client; return the answer's text."""
    async with openai.AsyncOpenAI(
        base_url=f"{loaded.base_url}/v1",
        api_key="unused",
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),  # loopback: no proxies
        max_retries=0,
    ) as client:
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [
            {"role": "user", "content": "who are you?"}
        ]
        if not stream:
            answer = await client.chat.completions.create(
                model=loaded.served_model_name, messages=messages
            )
            assert answer.model == loaded.served_model_name
            return answer.choices[0].message.content or ""
        parts = []
        chunks = await client.chat.completions.create(
            model=loaded.served_model_name, messages=messages, stream=True
        )
        async for chunk in chunks:
            parts.append(chunk.choices[0].delta.content or "")
        return "".join(parts)


async def argv_of(loaded: LoadedModel) -> list[str]:
    """The exact argv the stand-in received (it reports it in /v1/models)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"{loaded.base_url}/v1/models")
    argv: list[str] = response.json()["standin"]["argv"]
    return argv


def port_of(loaded: LoadedModel) -> str:
    return loaded.base_url.rsplit(":", 1)[1]


async def test_is_a_backend() -> None:
    assert isinstance(LocalProcessBackend(), Backend)


async def test_switches_between_three_models(
    backend: LocalProcessBackend, tracker: Tracker
) -> None:
    phases: list[str] = []
    for served in ("alpha", "beta", "gamma"):
        loaded = await backend.load(make_model(served), phases.append)
        assert loaded.served_model_name == served
        assert loaded.base_url.startswith("http://127.0.0.1:")
        assert await chat(loaded) == f"hello from {served}"
        assert await chat(loaded, stream=True) == f"hello from {served}"
    assert phases[:3] == ["starting process", "waiting for /health", "waiting for /v1/models"]
    assert "stopping alpha" in phases and "stopping beta" in phases
    # A switch waits until the old model's processes are gone before starting the next one.
    for old, new in (("alpha", "beta"), ("beta", "gamma")):
        assert tracker.of(old).leftovers() == []
        stopped = tracker.lines.index(f"[{old}] stopped (process exited with status 0)")
        starting = next(
            i for i, line in enumerate(tracker.lines) if line.startswith(f"[{new}] starting: ")
        )
        assert stopped < starting
    # The server's output reaches the log, prefixed with the served name.
    assert "[gamma] INFO Loading model org/gamma as 'gamma'" in tracker.lines


async def test_loading_the_loaded_model_again_keeps_its_process(
    backend: LocalProcessBackend, tracker: Tracker
) -> None:
    first = await backend.load(make_model("alpha"), lambda _: None)
    again = await backend.load(make_model("alpha"), lambda _: None)
    assert again == first
    assert len(tracker.started) == 1


async def test_crash_during_load_fails_at_once_with_the_last_output(
    backend: LocalProcessBackend, tracker: Tracker
) -> None:
    # Would take a minute to load; it crashes instead, and the load must say so at once.
    model = make_model("oom", "--standin-crash-during-load", load_time=60)
    with anyio.fail_after(10), pytest.raises(LoadError) as failure:
        await backend.load(model, lambda _: None)
    reason = failure.value.reason
    assert reason.startswith("process exited with status 1 during load; last output:\n")
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in reason
    assert any(line.startswith("[oom] torch.OutOfMemoryError") for line in tracker.lines)
    # The backend is usable afterwards.
    loaded = await backend.load(make_model("after"), lambda _: None)
    assert await chat(loaded) == "hello from after"


async def test_command_not_found_fails_the_load_with_the_reason(tracker: Tracker) -> None:
    backend = LocalProcessBackend("/nonexistent/vllm serve {model} {args}", grace_period=1.0)
    async with backend.session(lambda _, model=None: None):
        with anyio.fail_after(10), pytest.raises(LoadError) as failure:
            await backend.load(make_model("missing"), lambda _: None)
    assert failure.value.reason.startswith("process exited with status 127 during load")
    assert "cannot start '/nonexistent/vllm': No such file or directory" in failure.value.reason


async def test_a_server_that_loaded_another_model_fails_the_load_at_once(
    tracker: Tracker,
) -> None:
    # A command with a fixed model: the server answers to the served name, but its `root`
    # (the model it loaded, as vLLM reports it) is not the model's modelName.
    fixed = standin_command("org/fixed {args} --host 127.0.0.1 --port {port}")
    backend = LocalProcessBackend(fixed, grace_period=1.0)
    async with backend.session(lambda _, model=None: None):
        with anyio.fail_after(10), pytest.raises(LoadError) as failure:
            await backend.load(make_model("wanted", load_time=0.1), lambda _: None)
        reason = failure.value.reason
        assert "'org/fixed'" in reason
        assert "'org/wanted' (modelName)" in reason
        assert "another model" in reason
        # When the root is the modelName, the same command loads.
        loaded = await backend.load(make_model("fixed", model_name="org/fixed"), lambda _: None)
        assert await chat(loaded) == "hello from fixed"
    assert len(tracker.started) == 2


async def test_a_model_ignoring_sigterm_is_replaced_after_the_grace_period(
    backend: LocalProcessBackend, tracker: Tracker
) -> None:
    stubborn = make_model("stubborn", "--standin-ignore-sigterm", "--standin-spawn-child")
    await backend.load(stubborn, lambda _: None)
    assert tracker.of("stubborn").grandchild is not None
    loaded = await backend.load(make_model("next"), lambda _: None)
    assert await chat(loaded) == "hello from next"
    assert tracker.of("stubborn").leftovers() == []
    assert "[stubborn] standin: ignoring SIGTERM" in tracker.lines
    assert any(
        line.startswith("[stubborn] still running 1s after SIGTERM") for line in tracker.lines
    )
    assert "[stubborn] stopped (process was killed by SIGKILL)" in tracker.lines


async def test_a_crash_after_ready_is_reported_and_the_model_reloads(
    backend: LocalProcessBackend, tracker: Tracker, lost: LostRecorder
) -> None:
    flaky = make_model("flaky", "--standin-crash-after-ready", "0.3", "--standin-spawn-child")
    await backend.load(flaky, lambda _: None)
    first = tracker.of("flaky")
    with anyio.fail_after(10):
        await lost.event.wait()
    assert lost.reasons[0].startswith("process exited with status 3 after it was ready")
    assert "standin: engine core died unexpectedly" in lost.reasons[0]
    assert first.leftovers() == []  # its grandchild went with it
    # The next request reloads it: a new process, not the dead one.
    await backend.load(flaky, lambda _: None)
    assert tracker.of("flaky").pid != first.pid


async def test_cancelling_a_load_leaves_no_process(
    backend: LocalProcessBackend, tracker: Tracker
) -> None:
    slow = make_model("slow", "--standin-spawn-child", load_time=60)
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.load, slow, lambda _: None)
        with anyio.fail_after(10):
            await tracker.event("slow").wait()
        tg.cancel_scope.cancel()
    assert tracker.of("slow").leftovers() == []
    loaded = await backend.load(make_model("after"), lambda _: None)
    assert await chat(loaded) == "hello from after"


async def test_unload_and_leaving_the_session_leave_no_process(tracker: Tracker) -> None:
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with backend.session(lambda _, model=None: None):
        await backend.load(make_model("one", "--standin-spawn-child"), lambda _: None)
        await backend.unload()
        await backend.unload()  # idempotent
        assert tracker.of("one").leftovers() == []
        stubborn = make_model("two", "--standin-spawn-child", "--standin-ignore-sigterm")
        await backend.load(stubborn, lambda _: None)
    assert tracker.of("two").leftovers() == []
    # A new session on the same backend works.
    async with backend.session(lambda _, model=None: None):
        loaded = await backend.load(make_model("three"), lambda _: None)
        assert await chat(loaded) == "hello from three"


async def test_placeholders_are_substituted_per_word_without_a_shell(
    tracker: Tracker, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    served = f"a;b $(touch {marker}) `touch {marker}` | x"
    model = make_model(served, model_name="my org/model; echo hi")
    templates = {
        "default": "{model} {args} --host 127.0.0.1 --port {port}",
        "appended": "{model}",
        "extra_args": (
            "{model} --served-model-name {served_model_name} "
            "--tag=[{served_model_name}] {{literal}} {extra_args} --port={port}"
        ),
    }
    argvs = {}
    for key, template in templates.items():
        backend = LocalProcessBackend(standin_command(template), grace_period=1.0)
        async with backend.session(lambda _, model=None: None):
            loaded = await backend.load(model, lambda _: None)
            assert loaded.served_model_name == served
            assert await chat(loaded) == f"hello from {served}"
            argvs[key] = (await argv_of(loaded), port_of(loaded))
    flags = model.vllm_args(include_model=False)
    argv, port = argvs["default"]
    assert argv == ["my org/model; echo hi", *flags, "--host", "127.0.0.1", "--port", port]
    argv, port = argvs["appended"]
    assert argv == ["my org/model; echo hi", *flags, "--port", port]
    argv, port = argvs["extra_args"]
    assert argv == [
        "my org/model; echo hi",
        "--served-model-name",
        served,
        f"--tag=[{served}]",
        "{literal}",
        *model.extra_args,
        f"--port={port}",
    ]
    assert not marker.exists()


async def test_secrets_in_flags_never_reach_logs_or_reasons(tracker: Tracker) -> None:
    secret = "sk-very-secret-value"
    keyed = make_model("keyed", "--api-key", secret)
    # Without the key, /v1/models answers 401: fail at once with what to do.
    plain = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with plain.session(lambda _, model=None: None):
        with anyio.fail_after(10), pytest.raises(LoadError, match="--upstream-api-key"):
            await plain.load(keyed, lambda _: None)
    # With it, the model loads; and a crash's reason does not show the key either.
    backend = LocalProcessBackend(standin_command(), grace_period=1.0, api_key=secret)
    async with backend.session(lambda _, model=None: None):
        loaded = await backend.load(keyed, lambda _: None)
        assert loaded.served_model_name == "keyed"
        crashing = make_model("crashing", f"--api-key={secret}", "--standin-crash-during-load")
        with pytest.raises(LoadError) as failure:
            await backend.load(crashing, lambda _: None)
    assert "***" in failure.value.reason and secret not in failure.value.reason
    assert any("--api-key '***'" in line for line in tracker.lines)  # the echoed args
    assert not [line for line in tracker.lines if secret in line]


async def test_load_outside_a_session_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no session open"):
        await LocalProcessBackend().load(make_model("x"), lambda _: None)


async def test_a_bad_template_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"unknown placeholder \{modle\}"):
        LocalProcessBackend("vllm serve {modle} {args}")
