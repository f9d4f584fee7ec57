"""The `vllm-chill` command and `vllm_chill.app`, run as real processes."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from anyio.streams.text import TextReceiveStream
from kubernetes import client as k8s_client

from tests.k8s.cluster import model_manifest, simulated_cluster
from tests.processes import EXIT_TIMEOUT, REPO, START_TIMEOUT, env_for, running
from tests.support import chat
from vllm_chill._build import build_middleware
from vllm_chill._envapp import EnvConfiguredApp
from vllm_chill.settings import parse_settings

LOADING = "Model '{}' is currently loading. Please wait and retry in a few moments."


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_chill", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for(env),
        cwd=REPO,
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    for name in ("alpha-chat", "beta-coder"):
        (directory / f"{name}.yaml").write_text(
            textwrap.dedent(
                f"""\
                apiVersion: vllm.efortin.github.io/v1alpha1
                kind: VLLMModel
                metadata:
                  name: {name}
                spec:
                  modelName: test-org/{name}
                  servedModelName: {name}
                  maxModelLen: 4096
                """
            )
        )
    return directory


# --- one-line errors, exit status 2 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["serve", "--backend", "sim", "--models", "m", "--idle-timeout", "soon"],
            {},
            "vllm-chill serve: error: argument --idle-timeout: invalid duration 'soon'",
        ),
        (
            ["serve", "--backend", "sim", "--models", "m"],
            {"VLLM_CHILL_MAX_WAIT": "-3s"},
            "vllm-chill serve: error: argument --max-wait (from VLLM_CHILL_MAX_WAIT): "
            "invalid duration '-3s': must not be negative",
        ),
        (["serve"], {}, "vllm-chill serve: error: argument --backend: required"),
        (
            ["serve", "--backend", "sim", "--models", "m", "--idle-timout", "1m"],
            {},
            "vllm-chill serve: error: unrecognized arguments: --idle-timout 1m",
        ),
        (
            ["serve", "--backend", "sim", "--models", "/nonexistent/models"],
            {},
            "vllm-chill serve: error: argument --models: /nonexistent/models: ",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert result.stdout == ""


def test_an_invalid_manifest_is_one_line_too(models_dir: Path) -> None:
    (models_dir / "broken.yaml").write_text("kind: VLLMModel\nspec:\n  servedModelName: [\n")
    result = run_cli("serve", "--backend", "sim", "--models", str(models_dir))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "argument --models:" in result.stderr
    assert "broken.yaml" in result.stderr


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert (version.returncode, version.stdout) == (0, "vllm-chill 0.1.0\n")
    helped = run_cli("serve", "--help")
    assert helped.returncode == 0
    for flag in ("--enable-model-switch", "--model-switch-timeout", "VLLM_CHILL_IDLE_TIMEOUT"):
        assert flag in helped.stdout


def test_sim_server_is_the_simulator() -> None:
    result = run_cli("sim-server", "--help")
    assert result.returncode == 0
    assert "simulated vLLM" in result.stdout


# --- check-models ----------------------------------------------------------------------------


def test_check_models_prints_each_model_and_its_vllm_arguments(models_dir: Path) -> None:
    result = run_cli("check-models", str(models_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        # Only what the manifests set: every field left out keeps vLLM's own default.
        "alpha-chat (alpha-chat)",
        "  vllm serve test-org/alpha-chat --served-model-name alpha-chat --max-model-len 4096",
        "beta-coder (beta-coder)",
        "  vllm serve test-org/beta-coder --served-model-name beta-coder --max-model-len 4096",
        "2 model(s) valid",
    ]


def test_check_models_on_the_examples() -> None:
    result = run_cli("check-models", "manifests/examples")
    assert result.returncode == 0, result.stderr
    assert "qwen3-coder-30b-fp8 (qwen3-coder-30b-fp8)" in result.stdout
    assert "--reasoning-parser deepseek_r1" in result.stdout


def test_check_models_names_every_problem(models_dir: Path) -> None:
    (models_dir / "bad.yaml").write_text(
        "kind: VLLMModel\nmetadata: {name: bad}\n"
        "spec: {modelName: m, servedModelName: bad, tensorParallelSize: 0, dtype: fp7}\n"
    )
    result = run_cli("check-models", str(models_dir))
    assert result.returncode == 1
    assert "bad.yaml" in result.stderr
    assert "tensorParallelSize" in result.stderr
    assert "dtype" in result.stderr


# --- serving, end to end -------------------------------------------------------------------


def wait_for_state(client: httpx.Client, model: str, state: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while client.get(f"/v1/models/{model}").json()["state"] != state:
        assert time.monotonic() < deadline, f"{model} never {state}"
        time.sleep(0.05)


def post_chat(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json=chat(model, max_tokens=4))


def requests_answered(client: httpx.Client, model: str, status: int) -> float:
    text = client.get("/metrics").text
    pattern = rf'^vllm_chill_requests_total\{{model="{model}",status="{status}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_serve_sim_end_to_end(models_dir: Path) -> None:
    """The newcomer's command: a 503 with the loading body while loading, then the official
    client, retrying on Retry-After, gets its answer; SIGTERM ends it with status 0."""
    args = [sys.executable, "-m", "vllm_chill", "serve", "--backend", "sim"]
    args += ["--models", str(models_dir), "--host", "127.0.0.1", "--port", "0"]
    args += ["--sim-load-time", "0.3", "--sim-tokens-per-second", "0", "--idle-timeout", "500ms"]
    with running(args) as server:
        base = server.base_url()
        with httpx.Client(base_url=base, trust_env=False, timeout=30) as client:
            assert client.get("/health").text == "OK"

            first = post_chat(client, "alpha-chat")
            assert first.status_code == 503
            assert int(first.headers["retry-after"]) >= 1
            error = first.json()["error"]
            assert error["message"] == LOADING.format("alpha-chat")
            assert error["type"] == "model_loading"
            assert error["code"] == "model_switching_in_progress"

            # The client comes back as told and is answered; the model then idles to zero.
            # Its load time is known now, so the next client is told to come back in about a
            # second rather than the 30 s of an unknown model.
            wait_for_state(client, "alpha-chat", "loaded")
            assert post_chat(client, "alpha-chat").status_code == 200
            wait_for_state(client, "alpha-chat", "unloaded")
            with openai.DefaultHttpxClient(trust_env=False) as http:
                sdk = openai.OpenAI(
                    base_url=f"{base}/v1", api_key="unused", max_retries=10, http_client=http
                )
                answer = sdk.chat.completions.create(
                    model="alpha-chat",
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=4,
                )
            assert answer.model == "alpha-chat"
            assert answer.choices[0].message.content
            # The client's first try started the load (503) and it retried.
            assert requests_answered(client, "alpha-chat", 503) >= 2
            assert requests_answered(client, "alpha-chat", 200) == 2
        assert server.terminate() == 0
    assert "Traceback" not in server.log


@pytest.mark.slow
def test_uvicorn_runs_the_environment_configured_app(models_dir: Path) -> None:
    env = {
        "VLLM_CHILL_BACKEND": "sim",
        "VLLM_CHILL_MODELS": str(models_dir),
        "VLLM_CHILL_SIM_LOAD_TIME": "250ms",
        "VLLM_CHILL_MAX_WAIT": "30s",
        "VLLM_CHILL_LOG_FORMAT": "json",
        "VLLM_CHILL_API_KEY": "client-key-123",
    }
    args = [sys.executable, "-m", "uvicorn", "vllm_chill:app", "--host", "127.0.0.1", "--port", "0"]
    with running(args, env) as server:
        base = server.base_url()
        with openai.DefaultHttpxClient(trust_env=False) as http:
            sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="client-key-123", http_client=http)
            listed = sorted(m.id for m in sdk.models.list())
            assert listed == ["alpha-chat", "beta-coder"]
            answer = sdk.chat.completions.create(  # held while it loads (max wait 30s)
                model="beta-coder", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert answer.model == "beta-coder"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(
                    base_url=f"{base}/v1", api_key="wrong", http_client=http
                ).models.list()
        code = server.terminate()
    # uvicorn re-raises SIGTERM after its graceful shutdown: killed by it, or 0.
    assert code in (0, -signal.SIGTERM), server.log
    assert "Application shutdown complete" in server.log
    assert "client-key-123" not in server.log
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert any(r["logger"] == "vllm_chill.scheduler" for r in records)


@pytest.mark.slow
def test_uvicorn_fails_to_start_with_a_bad_environment() -> None:
    env = {"VLLM_CHILL_BACKEND": "sim", "VLLM_CHILL_MODELS": "m", "VLLM_CHILL_IDLE_TIMEOUT": "x"}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "vllm_chill:app", "--host", "127.0.0.1", "--port", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for(env),
        cwd=REPO,
    )
    assert result.returncode != 0
    assert (
        "argument --idle-timeout (from VLLM_CHILL_IDLE_TIMEOUT): invalid duration 'x'"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_serve_exits_nonzero_when_the_port_is_taken(models_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", "--backend", "sim", "--models", str(models_dir), "--host", "127.0.0.1",
            "--port", str(port),
        )  # fmt: skip
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()


# --- the environment-configured app, in process ---------------------------------------------


def test_importing_has_no_side_effects() -> None:
    code = textwrap.dedent(
        """
        import sys, threading
        import vllm_chill, vllm_chill._envapp
        app = vllm_chill.app
        assert type(app).__name__ == "EnvConfiguredApp", app
        assert threading.active_count() == 1, threading.enumerate()
        assert "kubernetes" not in sys.modules
        assert app.middleware is None and app.settings is None
        """
    )
    _run_python(code)


def test_the_sim_backend_does_not_import_kubernetes(models_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from vllm_chill._build import build_middleware
        from vllm_chill.settings import parse_settings
        app = build_middleware(parse_settings(["--backend=sim", "--models={models_dir}"], {{}}))
        assert type(app.backend).__name__ == "SimBackend"
        assert "kubernetes" not in sys.modules
        """
    )
    _run_python(code)


@pytest.mark.anyio
async def test_requests_before_startup_get_an_openai_shaped_503() -> None:
    app = EnvConfiguredApp({}, configure_logging=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/chat/completions", json={"model": "x"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "not_ready"


async def _startup(app: EnvConfiguredApp) -> list[dict[str, Any]]:
    """Send lifespan startup; collect what the app answers until it returns."""
    messages = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError  # unreachable

    async def send(message: Any) -> None:
        sent.append(dict(message))

    with anyio.fail_after(EXIT_TIMEOUT):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


@pytest.mark.anyio
async def test_a_bad_environment_fails_lifespan_startup_with_one_line() -> None:
    app = EnvConfiguredApp({"VLLM_CHILL_BACKEND": "sim"}, configure_logging=False)
    sent = await _startup(app)
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": "argument --models: required with the sim backend (or --registry "
            "kubernetes)",
        }
    ]
    assert app.middleware is None


@pytest.mark.anyio
async def test_the_app_is_configured_at_startup(models_dir: Path) -> None:
    environ = {"VLLM_CHILL_BACKEND": "sim", "VLLM_CHILL_MODELS": str(models_dir)}
    app = EnvConfiguredApp(environ, configure_logging=False)
    served: list[httpx.Response] = []

    async def receive() -> dict[str, Any]:
        if not served:  # first call: startup; second: shutdown once a request was served
            served.append(httpx.Response(0))
            return {"type": "lifespan.startup"}
        await started.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            served.append(await client.get("/v1/models"))
        return {"type": "lifespan.shutdown"}

    started = anyio.Event()
    sent: list[str] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()

    with anyio.fail_after(EXIT_TIMEOUT):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert [m["id"] for m in served[1].json()["data"]] == ["alpha-chat", "beta-coder"]
    assert app.settings is not None and app.settings.backend == "sim"
    assert app.middleware is None  # stopped: back to 503s


# --- what the factory builds (constructed only: nothing starts, no network) -----------------

EXAMPLE_COMMAND = [
    "--enable-model-switch",
    "--configmap",
    "vllm-config",
    "--namespace",
    "ai-apps",
    "--deployment",
    "vllm",
    "--model-switch-timeout",
    "5m",
]


def _offline_api_client() -> Any:
    return k8s_client.ApiClient(k8s_client.Configuration(host="http://127.0.0.1:9"))


@pytest.mark.parametrize(
    ("extra", "registry"),
    [
        ([], "CRDRegistry"),
        (["--models", "manifests/examples"], "FileRegistry"),
        (["--no-enable-model-switch"], "DeploymentModelRegistry"),
    ],
)
def test_the_example_command_builds_the_kubernetes_backend(extra: list[str], registry: str) -> None:
    settings = parse_settings([*EXAMPLE_COMMAND, *extra], {})
    app = build_middleware(settings, api_client=_offline_api_client())
    assert type(app.backend).__name__ == "K8sDeploymentBackend"
    assert type(app.registry).__name__ == registry
    assert app.settings.switching.model_switch_timeout == 300


def test_options_reach_the_middleware(models_dir: Path) -> None:
    settings = parse_settings(
        [
            "--backend=sim",
            f"--models={models_dir}",
            "--max-wait=2s",
            "--api-key=k1",
            "--api-key=k2",
            "--min-residency=7s",
            "--quiet-gap=1s",
            "--first-load-estimate=2m",
            "--failure-backoff=3s",
            "--failure-backoff-max=1m",
            "--drain-timeout=9s",
            "--max-waiting=17",
        ],
        {"VLLM_CHILL_IDLE_TIMEOUT": "0", "VLLM_CHILL_UPSTREAM_API_KEY": "up"},
    )
    app = build_middleware(settings)
    assert app.settings == settings
    assert (settings.switching.max_wait, settings.switching.idle_timeout) == (2, 0)
    assert (settings.security.api_keys, settings.upstream.api_key) == (("k1", "k2"), "up")
    # Every switching setting the decision core has reaches it, under the same name.
    core = app.switcher.core
    shared = set(vars(settings.switching)) & set(vars(core))
    assert shared >= {"idle_timeout", "min_residency", "quiet_gap", "first_load_estimate"}
    for name in shared:
        assert getattr(core, name) == getattr(settings.switching, name), name
    assert core.max_waiting == 17


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_example_command_against_a_simulated_cluster(tmp_path: Path) -> None:
    """The Kubernetes example's exact command, plus where to find the (emulated) cluster and its
    Service: the namespace's VLLMModels are listed, a request loads its model into the
    Deployment (args and ConfigMap) with the loading 503 meanwhile, then that model answers."""
    manifests = [model_manifest("deepseek-r1-fp8"), model_manifest("qwen3-coder-30b-fp8")]
    async with simulated_cluster(models=manifests) as cluster:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps(_kubeconfig(cluster.api_url)))
        args = [sys.executable, "-m", "vllm_chill", "serve", *EXAMPLE_COMMAND]
        args += ["--kubeconfig", str(kubeconfig), "--upstream", cluster.upstream]
        args += ["--host", "127.0.0.1", "--port", "0"]
        log = _Log()
        process = await anyio.open_process(args, stdout=subprocess.DEVNULL, env=env_for(), cwd=REPO)
        async with process, anyio.create_task_group() as tg:
            tg.start_soon(log.read, process)
            try:
                with anyio.fail_after(START_TIMEOUT):
                    await log.listening.wait()
                async with httpx.AsyncClient(base_url=log.url, trust_env=False) as client:
                    await _load_and_answer(client, "deepseek-r1-fp8")
                assert "deepseek-r1-fp8" in cluster.args()
                assert cluster.configmap_data()["SERVED_MODEL_NAME"] == "deepseek-r1-fp8"
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(EXIT_TIMEOUT):
                    assert await process.wait() == 0
                assert "Traceback" not in "".join(log.lines)
            except BaseException:
                print("".join(log.lines))  # shown by pytest with the failure
                process.kill()
                raise


async def _load_and_answer(client: httpx.AsyncClient, model: str) -> None:
    listed = (await client.get("/v1/models")).json()["data"]
    assert sorted(m["id"] for m in listed) == ["deepseek-r1-fp8", "qwen3-coder-30b-fp8"]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    loading = await client.post("/v1/chat/completions", json=body)
    assert loading.status_code == 503
    assert loading.json()["error"]["code"] == "model_switching_in_progress"
    with anyio.fail_after(START_TIMEOUT):
        while (await client.get(f"/v1/models/{model}")).json()["state"] != "loaded":
            await anyio.sleep(0.05)
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200
    assert answer.json()["model"] == model


def _kubeconfig(server: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sim", "cluster": {"server": server}}],
        "users": [{"name": "sim", "user": {}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "sim"}}],
        "current-context": "sim",
    }


class _Log:
    """A child's stderr, read to its end (so the pipe never fills), watched for the address."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.listening = anyio.Event()
        self.url = ""

    async def read(self, process: Any) -> None:
        buffer = ""
        try:
            async for chunk in TextReceiveStream(process.stderr):
                buffer += chunk
                *complete, buffer = buffer.split("\n")
                for line in complete:
                    self.lines.append(line + "\n")
                    match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                    if match:
                        self.url = match.group(1)
                        self.listening.set()
        finally:
            self.listening.set()  # exited: the waiter sees no URL instead of timing out


def _run_python(code: str) -> None:
    """Run `code` in a fresh interpreter (nothing imported yet); it must succeed."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for(),
    )
    assert result.returncode == 0, result.stderr
