"""Security promises: keys compared in constant time over every key, admin endpoints behind the
admin token, no secret in any log line or error body, and the example deployment running the
proxy as non-root on a read-only root filesystem with least-privilege RBAC.

(Operator paths never forwarded: `test_hostile.py`; the RBAC being sufficient for what the
backend really calls: `test_k8s_faults.py`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.local.local_helpers import make_model, standin_command
from tests.support import chat, free_port, spec
from vllm_chill import FakeBackend
from vllm_chill.backends.local._backend import LocalProcessBackend

from .helpers import (
    MODELS,
    Reply,
    Stack,
    build_request,
    openai_error,
    proxy_stack,
    recording_sim,
    send_raw,
)

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "kubernetes-with-model-switching.yaml"

KEYS = ("sk-client-key-one-7f3a9c", "k2", "sk-a-much-longer-client-key-" + "9" * 40)
ADMIN = "adm-token-s3cret-5e1b"
UPSTREAM = "up-key-s3cret-0c4d"
WRONG = "sk-wrong-guess-from-a-client-88aa"
SECRETS = (*KEYS, ADMIN, UPSTREAM, WRONG)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def chat_as(stack: Stack, headers: list[tuple[str, str]], model: str = "alpha") -> Reply:
    return await stack.post("/v1/chat/completions", chat(model, max_tokens=2), headers=headers)


# --- API keys -------------------------------------------------------------------------------


async def test_every_key_works_and_every_near_miss_is_refused() -> None:
    async with proxy_stack(max_wait=5, api_keys=KEYS) as stack:
        for key in KEYS:
            assert (await chat_as(stack, bearer(key))).status == 200, key
            assert (await chat_as(stack, [("authorization", f"bearer {key}")])).status == 200
        near_misses = [
            [],
            [("authorization", "")],
            [("authorization", "Bearer")],
            [("authorization", "Bearer ")],
            [("authorization", f"Basic {KEYS[0]}")],
            [("authorization", KEYS[0])],
            bearer(KEYS[0][:-1]),
            bearer(KEYS[0] + "x"),
            bearer(KEYS[0].upper()),
            bearer(KEYS[0] + KEYS[1]),
            bearer(KEYS[1][:1]),
            bearer(" ".join(KEYS)),
            bearer(ADMIN),  # the admin token is not a client key
        ]
        for headers in near_misses:
            reply = await chat_as(stack, headers)
            assert reply.status == 401, headers
            assert openai_error(reply)["code"] == "invalid_api_key"
        models = await stack.get("/v1/models")
        assert models.status == 401  # the model list is behind the keys too
        assert (await stack.get("/health")).status == 200  # probes are not


@pytest.fixture(scope="module")
async def keyed() -> AsyncIterator[Stack]:
    """One proxy with keys for the module's property and spy tests."""
    async with proxy_stack(max_wait=5, api_keys=KEYS) as stack:
        yield stack


@settings(max_examples=100, deadline=None, database=None)
@given(value=st.binary(max_size=80))
async def test_any_authorization_value_that_is_not_a_key_is_refused(
    keyed: Stack, value: bytes
) -> None:
    """Whatever a client puts in the header (visible bytes, spaces, obs-text)."""
    value = bytes(c for c in value if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
    scheme, _, token = value.partition(b" ")
    reply = await chat_as(keyed, [("authorization", value.decode("latin-1"))])
    if scheme.lower() == b"bearer" and token.strip().decode("latin-1") in KEYS:
        assert reply.status == 200
    else:
        assert reply.status == 401 and openai_error(reply)["code"] == "invalid_api_key"


async def test_every_key_is_compared_in_constant_time(
    keyed: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code review: the check is `hmac.compare_digest` of SHA-256 digests over every
    configured key, OR-ed without an early exit (middleware.py, `_authorized`). Behaviour:
    whichever key matches, or none, the request costs one `compare_digest` of equal-length
    digests per key, so neither the time taken nor the number of comparisons says which key
    (or how much of one, or how long one is) was right."""
    digests = {hashlib.sha256(k.encode()).digest(): k for k in KEYS}
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        if isinstance(b, bytes) and b in digests:
            calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token in (KEYS[0], KEYS[1], KEYS[2], WRONG, KEYS[0][:5]):
        calls.clear()
        await chat_as(keyed, bearer(token))
        compared = sorted(digests[key] for _, key in calls)
        assert compared == sorted(KEYS), token  # all, once each
        assert all(given == hashlib.sha256(token.encode()).digest() for given, _ in calls)


# --- admin endpoints ------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/proxy/status", None),
    ("GET", "/proxy/models", None),
    ("POST", "/proxy/models/switch", {"model": "beta"}),
    ("POST", "/proxy/unload", None),
]


async def test_admin_endpoints_need_the_admin_token_and_nothing_else_opens_them() -> None:
    async with proxy_stack(max_wait=5, api_keys=KEYS, admin_token=ADMIN) as stack:
        for method, path, body in ADMIN_CALLS:
            data = json.dumps(body).encode() if body is not None else b""
            for headers in ([], bearer(KEYS[0]), bearer(WRONG), bearer(ADMIN + "x")):
                reply = await send_raw(
                    stack.port, build_request(method, path, headers=headers, body=data)
                )
                assert reply.status == 401, (path, headers, reply)
                assert openai_error(reply)["code"] == "invalid_api_key"
            reply = await send_raw(
                stack.port, build_request(method, path, headers=bearer(ADMIN), body=data)
            )
            assert reply.status in (200, 202), (path, reply)
        # and the admin token opens nothing but the admin endpoints
        assert (await chat_as(stack, bearer(ADMIN))).status == 401


# --- no secret in any log line or error body --------------------------------------------------


class Capture(logging.Handler):
    """Every record of every logger, formatted with its traceback, at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.exc_info and not record.exc_text:
            text += "".join(traceback.format_exception(*record.exc_info))
        # The raw arguments too: a secret passed to a DEBUG call must not hide behind %r.
        self.lines.append(f"{text} {record.args!r}")


@pytest.fixture
def captured() -> Iterator[Capture]:
    root = logging.getLogger()
    handler = Capture()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def assert_no_secret(texts: list[str], secrets: tuple[str, ...] = SECRETS) -> None:
    leaks = [(secret, text[:300]) for text in texts for secret in secrets if secret in text]
    assert leaks == [], leaks


def reply_text(reply: Reply) -> str:
    return json.dumps(reply.headers) + reply.body.decode("latin-1")


async def test_no_secret_in_logs_or_answers_across_a_session_with_failures(
    captured: Capture,
) -> None:
    """Good and bad keys, admin calls, streams, a disconnect, a failed load, an unreachable
    upstream, bad bodies: nothing the proxy logs (at DEBUG, every logger) or answers carries
    a key, the admin token or the upstream key."""
    answers: list[str] = []
    seen: list[str] = []
    sims = {
        name: recording_sim(name, seen, api_key=UPSTREAM, tokens_per_second=50) for name in MODELS
    }
    async with (
        sims["alpha"],
        sims["beta"],
        sims["gamma"],
        proxy_stack(
            models=[spec(m) for m in (*MODELS, "broken")],
            backend=FakeBackend(
                load_time=0.01,
                failures={"broken": "Back-off restarting failed container (CrashLoopBackOff)"},
                base_urls={name: sim.base_url for name, sim in sims.items()},
            ),
            max_wait=5,
            api_keys=KEYS,
            admin_token=ADMIN,
            upstream_api_key=UPSTREAM,
            max_body_size=4096,
        ) as stack,
    ):

        def body(model: str, **extra: Any) -> bytes:
            return json.dumps(chat(model, max_tokens=2, **extra)).encode()

        session: list[tuple[str, str, list[tuple[str, str]], bytes]] = [
            ("POST", "/v1/chat/completions", bearer(KEYS[0]), body("alpha")),
            ("POST", "/v1/chat/completions", bearer(WRONG), body("alpha")),
            ("POST", "/v1/chat/completions", [], body("alpha")),
            ("POST", "/v1/chat/completions", bearer(KEYS[1]), b"{not json"),
            ("POST", "/v1/chat/completions", bearer(KEYS[1]), b"x" * 5000),
            ("POST", "/v1/chat/completions", bearer(KEYS[2]), body("nope")),
            ("POST", "/v1/chat/completions", bearer(KEYS[2]), body("broken")),
            ("POST", "/v1/chat/completions", bearer(KEYS[0]), body("beta", stream=True)),
            ("GET", "/v1/models", bearer(KEYS[0]), b""),
            ("GET", "/v1/models/alpha", bearer(WRONG), b""),
            ("GET", "/proxy/status", bearer(ADMIN), b""),
            ("GET", "/proxy/models", bearer(ADMIN), b""),
            ("GET", "/proxy/status", bearer(WRONG), b""),
            ("POST", "/proxy/models/switch", bearer(ADMIN), b'{"model": "gamma"}'),
            ("POST", "/proxy/unload", bearer(KEYS[0]), b""),
            ("GET", "/metrics", [], b""),
            ("POST", "/sleep", bearer(KEYS[0]), b"{}"),
        ]  # fmt: skip
        for method, path, headers, data in session:
            reply = await send_raw(
                stack.port, build_request(method, path, headers=headers, body=data or None)
            )
            answers.append(reply_text(reply))
        # A client leaving mid-stream, then an upstream that is gone (502).
        with pytest.raises(TimeoutError):
            await send_raw(
                stack.port,
                build_request(
                    "POST",
                    "/v1/chat/completions",
                    headers=bearer(KEYS[0]),
                    body=json.dumps(chat("alpha", stream=True, max_tokens=50)).encode(),
                ),
                timeout=0.3,
            )
        await sims["alpha"].stop()
        reply = await chat_as(stack, bearer(KEYS[0]), "alpha")
        assert reply.status == 502
        answers.append(reply_text(reply))
        # The upstream key did reach the upstream, and only there.
        assert sims["beta"].stats.history[-1].header("authorization") == f"Bearer {UPSTREAM}"
    assert_no_secret(answers)
    assert_no_secret(captured.lines)
    assert any("upstream unavailable" in line for line in captured.lines)  # it did log


async def test_no_secret_from_the_local_backend_even_when_the_server_prints_it(
    captured: Capture,
) -> None:
    """vLLM prints its arguments (`--api-key` included) at start-up; the local backend relays
    the server's output to the log and into load-failure reasons, masked."""
    key = UPSTREAM
    ok = make_model("ok", "--api-key", key, load_time=0.05)
    crashing = make_model("oom", "--api-key", key, "--standin-crash-during-load")
    backend = LocalProcessBackend(standin_command(), grace_period=1.0, api_key=key)
    async with proxy_stack(
        models=[ok, crashing], backend=backend, max_wait=20, upstream_api_key=key
    ) as stack:
        with anyio.fail_after(30):
            good = await chat_as(stack, [], "ok")
            bad = await chat_as(stack, [], "oom")
    assert good.status == 200, good
    assert bad.status == 503 and openai_error(bad)["code"] == "model_switch_failed"
    assert "CUDA out of memory" in openai_error(bad)["message"]  # the reason is there...
    assert_no_secret([reply_text(good), reply_text(bad)], (key,))  # ...the key is not
    assert_no_secret(captured.lines, (key,))
    assert any("args:" in line and "***" in line for line in captured.lines)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_in_the_served_processes_output(log_format: str, tmp_path: Path) -> None:
    """`vllm-chill serve` itself, secrets given as environment variables, at debug level: a
    session with good and bad keys and a failed load, then its whole output grepped."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.yaml").write_text(
        yaml.safe_dump_all(
            [
                {"apiVersion": "vllm.efortin.github.io/v1alpha1", "kind": "VLLMModel",
                 "metadata": {"name": name},
                 "spec": {"modelName": f"org/{name}", "servedModelName": name,
                          "extraArgs": extra}}
                for name, extra in (("alpha", []), ("broken", ["--sim-fail-load"]))
            ]
        )
    )  # fmt: skip
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CHILL_API_KEY": KEYS[0],
        "VLLM_CHILL_ADMIN_TOKEN": ADMIN,
        "VLLM_CHILL_UPSTREAM_API_KEY": UPSTREAM,
    }
    command = [
        sys.executable, "-m", "vllm_chill", "serve", "--backend", "sim",
        "--models", str(models), "--host", "127.0.0.1", "--port", str(port),
        "--sim-load-time", "0.05", "--sim-tokens-per-second", "0", "--max-wait", "10",
        "--log-level", "debug", "--log-format", log_format,
    ]  # fmt: skip
    output = bytearray()
    answers: list[str] = []
    async with (
        await anyio.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        ) as process,
        anyio.create_task_group() as tg,
    ):
        assert process.stdout is not None
        tg.start_soon(_drain, process.stdout, output)  # a full pipe would block its logging
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as http:
                with anyio.fail_after(20):
                    while True:
                        try:
                            if (await http.get("/readyz")).status_code == 200:
                                break
                        except httpx.TransportError:
                            await anyio.sleep(0.05)
                # The failing model first: the other then loads without waiting for a
                # residency to end.
                for headers, model in (
                    ({"authorization": f"Bearer {KEYS[0]}"}, "broken"),
                    ({"authorization": f"Bearer {WRONG}"}, "alpha"),
                    ({"authorization": f"Bearer {KEYS[0]}"}, "alpha"),
                    ({"authorization": f"Bearer {KEYS[0]}"}, "nope"),
                ):
                    r = await http.post("/v1/chat/completions", json=chat(model), headers=headers)
                    answers.append(json.dumps(dict(r.headers)) + r.text)
                assert [a.count('"code"') for a in answers] == [1, 1, 0, 1]  # 503, 401, 200, 404
                r = await http.get("/proxy/status", headers={"authorization": f"Bearer {ADMIN}"})
                answers.append(r.text)
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await process.wait()
    text = output.decode("utf-8", "replace")
    assert "switch phase=failed model=broken" in text  # it did log, at length
    assert_no_secret(answers)
    assert_no_secret(text.splitlines())


async def _drain(stream: Any, into: bytearray) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            into += await stream.receive()


# --- the example deployment -------------------------------------------------------------------


def example_documents() -> list[dict[str, Any]]:
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE.relative_to(REPO)} does not exist yet")
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def _proxy_deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    for doc in documents:
        if doc["kind"] == "Deployment":
            containers = doc["spec"]["template"]["spec"]["containers"]
            if any("vllm-chill" in c["image"] for c in containers):
                return doc
    raise AssertionError("no vllm-chill Deployment in the example")


def test_the_proxy_runs_as_non_root_on_a_read_only_root_filesystem() -> None:
    deployment = _proxy_deployment(example_documents())
    pod = deployment["spec"]["template"]["spec"]
    pod_context = pod.get("securityContext", {})
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["containers"]:
        context = {**pod_context, **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, container["name"]
        assert context.get("runAsUser", 1) != 0, container["name"]
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert not context.get("privileged", False), container["name"]
        assert "ALL" in context.get("capabilities", {}).get("drop", []), container["name"]
        assert not context.get("capabilities", {}).get("add"), container["name"]
        assert context.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    # The image agrees: a numeric non-root USER, so that runAsNonRoot can verify it.
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"


#: Verbs that hand out more than the proxy's job: deleting things, changing permissions.
FORBIDDEN_VERBS = {"*", "delete", "deletecollection", "escalate", "bind", "impersonate"}
#: Resources the proxy has no business with at all.
FORBIDDEN_RESOURCES = {
    "*",
    "secrets",
    "serviceaccounts",
    "roles",
    "rolebindings",
    "nodes",
    "pods/exec",
    "pods/attach",
    "pods/portforward",
    "persistentvolumeclaims",
}


def test_rbac_is_namespaced_and_least_privilege() -> None:
    documents = example_documents()
    kinds = [d["kind"] for d in documents]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    deployment = _proxy_deployment(documents)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    managed = {
        "deployments": args[args.index("--deployment") + 1],
        "configmaps": args[args.index("--configmap") + 1] if "--configmap" in args else None,
    }
    roles = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Role"}
    bindings = [d for d in documents if d["kind"] == "RoleBinding"]
    assert bindings
    for binding in bindings:
        assert binding["metadata"]["namespace"] == namespace
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        ]
        role = roles[binding["roleRef"]["name"]]
        assert role["metadata"]["namespace"] == namespace
        for rule in role["rules"]:
            verbs, resources = set(rule["verbs"]), set(rule["resources"])
            assert "*" not in rule["apiGroups"], rule
            assert not verbs & FORBIDDEN_VERBS, rule
            assert not resources & FORBIDDEN_RESOURCES, rule
            assert "create" not in verbs or resources == {"events"}, rule  # makes nothing else
            writes = verbs & {"patch", "update"}
            for resource in resources & {"deployments", "configmaps"}:
                if writes:  # writes only to the one Deployment / ConfigMap it manages
                    assert rule.get("resourceNames") == [managed[resource]], rule
