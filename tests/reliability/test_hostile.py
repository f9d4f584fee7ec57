"""Hostile input against a running proxy ("No input may produce a 500 or a
traceback in the response; nothing a client sends can make the process exit").

One proxy (real uvicorn on loopback, `FakeBackend`, one real simulated vLLM per model) serves
the whole module; Hypothesis throws bodies, headers, paths, multipart forms and model names at
it over raw sockets. Every answer must be a success or a 4xx, or one of the documented 5xx, the
proxy's own errors in OpenAI's shape; no operator path may reach an upstream; and after all of
it the server still answers and holds no task it did not hold before.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support import chat, spec

from .helpers import (
    MODELS,
    OPERATOR_PATHS,
    NoReply,
    Reply,
    Snapshot,
    Stack,
    assert_no_leak,
    build_request,
    check_reply,
    chunked,
    loosely_routed_path,
    openai_error,
    proxy_stack,
    routed_path,
    send_raw,
)

pytestmark = pytest.mark.anyio

#: Small, so that "over the limit" costs little (the rule is the same at 64 MiB), and still
#: above a body carrying a 100 KB model name.
LIMIT = 256 * 1024
#: A served name with a slash, as most Hugging Face names are: `/v1/models/{id}` must find it.
SLASHED = "meta-llama/Llama-3.1-8B"
#: A served name full of shell metacharacters: it is data, whatever the path it travels.
NASTY = "m; rm -rf ~ && $(id) `id` | x > y < z & 'q' \"dq\" \\ *?"
REGISTERED = (*MODELS, SLASHED, NASTY)
MODEL_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    "/v1/score",
    "/v1/pooling",
    "/tokenize",
    "/detokenize",
)
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # `_name_the_test` only names the tally's row
    ],
    database=None,
)


#: What was sent and what came back, per test: printed when the module ends (run with -s to
#: see it; docs/reliability.md quotes it).
TALLY: Counter[tuple[str, str]] = Counter()


CURRENT_TEST = ["?"]


@pytest.fixture(autouse=True)
def _name_the_test(request: pytest.FixtureRequest) -> None:
    CURRENT_TEST[0] = request.node.originalname.removeprefix("test_")


def tally(reply: Reply | None) -> None:
    TALLY[CURRENT_TEST[0], "no answer" if reply is None else str(reply.status)] += 1


def print_tally() -> None:
    by_test: dict[str, dict[str, int]] = {}
    for (test, outcome), count in sorted(TALLY.items()):
        by_test.setdefault(test, {})[outcome] = count
    print("\nhostile input: requests sent and answers, per test")
    for test, outcomes in by_test.items():
        total = sum(outcomes.values())
        detail = ", ".join(f"{outcome}: {count}" for outcome, count in outcomes.items())
        print(f"  {test}: {total} requests ({detail})")
    print(f"  total: {sum(TALLY.values())} requests, no 500, server up")


@pytest.fixture(scope="module")
async def proxy() -> AsyncIterator[Stack]:
    models = [spec(name) for name in REGISTERED]
    async with proxy_stack(models=models, max_wait=5, max_body_size=LIMIT, idle_timeout=0) as stack:
        # Load one model so that forwarded requests are answered by a live upstream.
        assert (await stack.post("/v1/chat/completions", chat("alpha"))).status == 200
        before = Snapshot.take()
        yield stack
        # After everything this module sent: still up, still truthful, nothing left behind.
        assert (await stack.get("/health")).body == b"OK"
        status = await stack.wait_status(lambda st: st["requests_in_flight"] == {})
        assert status["requests_waiting"] == {}
        assert status["active_model"] in REGISTERED
        await assert_no_leak(before, fd_slack=16)
        print_tally()


async def send(stack: Stack, head: bytes, parts: Any = (), **kw: Any) -> Reply:
    """`send_raw`, counted in the tally (a `NoReply` too, re-raised)."""
    try:
        reply = await send_raw(stack.port, head, parts, **kw)
    except NoReply:
        tally(None)
        raise
    tally(reply)
    return reply


async def exchange(stack: Stack, head: bytes, parts: tuple[bytes, ...] = ()) -> Reply:
    """Send; check the answer against the rules; return it."""
    upstream_before = stack.upstream_requests()
    reply = await send(stack, head, parts)
    check_reply(reply, from_upstream=stack.upstream_requests() != upstream_before)
    return reply


def assert_no_operator_path_reached(stack: Stack) -> None:
    reached = [p for p in stack.upstream_paths() if routed_path(p) in OPERATOR_PATHS]
    assert reached == [], reached


# --- strategies -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
model_values = st.sampled_from(REGISTERED) | json_values | st.text(max_size=300)
request_objects = st.fixed_dictionaries(
    {"model": model_values},
    optional={
        "messages": st.just([{"role": "user", "content": "hi"}]) | json_values,
        "prompt": st.text(max_size=20) | json_values,
        "input": st.text(max_size=20),
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-5, 5) | json_values,
    },
)


def encoded(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = opener * depth + b"1" + closer * depth
    return b'{"model":"alpha","messages":' + inner + b"}"


@st.composite
def broken(draw: st.DrawFn) -> bytes:
    """A plausible body, then damaged: cut short, or a byte swapped for invalid UTF-8."""
    body = encoded(draw(request_objects))
    cut = draw(st.integers(0, len(body)))
    if draw(st.booleans()):
        return body[:cut]
    return (
        body[:cut]
        + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"]))
        + body[cut:]
    )


bodies = (
    request_objects.map(encoded)
    | json_values.map(encoded)
    | nested()
    | broken()
    | st.binary(max_size=512)
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=latin-1",
        "text/plain",
        "",
        "multipart/form-data",
        "multipart/form-data; boundary=zz",
        "application/x-www-form-urlencoded",
    ]
)


# --- bodies -----------------------------------------------------------------------------------


@PROPERTY
@given(
    path=st.sampled_from([*MODEL_PATHS, "/v1/anything", "/v1/chat/completions/"]),
    method=st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH"]),
    body=bodies,
    content_type=content_types,
)
@example(path="/v1/chat/completions", method="POST", body=b"[" * 100_000, content_type="")
@example(
    path="/v1/chat/completions",
    method="POST",
    body=b'{"model":"alpha","messages":' + b"[" * 990 + b"]" * 990 + b"}",
    content_type="application/json",
)
@example(path="/v1/chat/completions", method="POST", body=b'{"model":"\xff"}', content_type="")
@example(
    path="/v1/chat/completions",
    method="POST",
    body=b'{"model":"\\ud800","messages":[]}',  # a lone surrogate, escaped: valid JSON
    content_type="application/json",
)
@example(
    path="/v1/completions",
    method="POST",
    body=encoded({"model": "x" * 100_000}),
    content_type="application/json",
)
async def test_any_body_gets_a_success_or_an_openai_4xx(
    proxy: Stack, path: str, method: str, body: bytes, content_type: str
) -> None:
    headers = [("content-type", content_type)] if content_type else []
    reply = await exchange(proxy, build_request(method, path, headers=headers, body=body))
    if reply.status >= 400 and b'"model_not_found"' in reply.body:
        assert len(reply.body) < 2048  # a long name is refused, not echoed back at length


@PROPERTY
@given(body=bodies, size=st.integers(1, 64))
async def test_chunked_bodies_of_any_shape(proxy: Stack, body: bytes, size: int) -> None:
    head = build_request(
        "POST",
        "/v1/chat/completions",
        headers=[("content-type", "application/json"), ("transfer-encoding", "chunked")],
    )
    await exchange(proxy, head, (b"".join(chunked(body, size)),))


# --- headers ----------------------------------------------------------------------------------

TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=20,
)
INTERESTING_NAMES = st.sampled_from(
    [
        "authorization",
        "content-type",
        "connection",
        "expect",
        "upgrade",
        "te",
        "trailer",
        "host",
        "keep-alive",
        "proxy-authorization",
        "x-forwarded-for",
        "accept-encoding",
        "cookie",
    ]
)
# Header values: visible ASCII, spaces and tabs, and obs-text bytes (0x80-0xff).
VALUE = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)


@PROPERTY
@given(
    headers=st.lists(
        st.tuples(INTERESTING_NAMES | TOKEN, VALUE | TOKEN.map(str.encode)), max_size=8
    ),
    model=st.sampled_from(REGISTERED),
    stream=st.booleans(),
)
@example(
    headers=[("connection", b"authorization, content-type, host")], model="alpha", stream=False
)
@example(headers=[("expect", b"100-continue")], model="beta", stream=True)
@example(headers=[("upgrade", b"h2c"), ("connection", b"Upgrade")], model="alpha", stream=False)
@example(
    headers=[("content-type", b"multipart/form-data; boundary=" + b"b" * 300)],
    model="alpha",
    stream=False,
)
async def test_any_headers(
    proxy: Stack, headers: list[tuple[str, bytes]], model: str, stream: bool
) -> None:
    body = encoded(chat(model, stream=stream, max_tokens=2))
    await exchange(proxy, build_request("POST", "/v1/chat/completions", headers=headers, body=body))


FRAMING = [
    [("content-length", "5"), ("content-length", "7")],
    [("content-length", "-1")],
    [("content-length", "abc")],
    [("content-length", "1e3")],
    [("content-length", "99999999999999999999999999")],
    [("transfer-encoding", "chunked"), ("content-length", "10")],
    [("transfer-encoding", "gzip, chunked")],
    [("transfer-encoding", "identity")],
    [("transfer-encoding", "chunked, chunked")],
]


@pytest.mark.parametrize("framing", FRAMING, ids=lambda f: ";".join(f"{k}={v}" for k, v in f))
async def test_contradictory_or_broken_framing(
    proxy: Stack, framing: list[tuple[str, str]]
) -> None:
    body = b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}'
    head = build_request("POST", "/v1/chat/completions", headers=framing, body=body)
    try:
        reply = await send(proxy, head, timeout=2)
    except (NoReply, TimeoutError):
        return  # the server refused to read it, or waits for bytes that never come: both fine
    check_reply(reply, from_upstream=False)


# --- multipart forms --------------------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"


@st.composite
def multipart(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(content-type, body): parts with names and values of any kind, sometimes damaged."""
    boundary = draw(st.text(alphabet=BCHARS, min_size=1, max_size=300)).encode()
    parts = draw(
        st.lists(
            st.tuples(
                st.sampled_from([b"model", b"file", b"language", b"prompt"])
                | st.binary(max_size=10),
                st.sampled_from([name.encode() for name in REGISTERED])
                | st.binary(max_size=100)
                | st.text(max_size=300).map(str.encode),
                st.booleans(),
            ),
            max_size=4,
        )
    )
    body = b""
    for name, value, is_file in parts:
        disposition = b'form-data; name="' + name + b'"'
        if is_file:
            disposition += b'; filename="a.wav"\r\ncontent-type: audio/wav'
        body += b"--" + boundary + b"\r\ncontent-disposition: " + disposition + b"\r\n\r\n"
        body += value + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    header_boundary = boundary if draw(st.integers(0, 9)) else draw(st.binary(max_size=20))
    content_type = b"multipart/form-data; boundary=" + header_boundary
    return content_type, body


@PROPERTY
@given(form=multipart(), path=st.sampled_from(AUDIO_PATHS))
@example(
    form=(b"multipart/form-data; boundary=" + b"b" * 300, b"--" + b"b" * 300 + b"--\r\n"),
    path="/v1/audio/transcriptions",
)
@example(
    form=(
        b"multipart/form-data; boundary=zz",
        b'--zz\r\ncontent-disposition: form-data; name="model"\r\n\r\n'
        + b"x" * 100_000
        + b"\r\n--zz--\r\n",
    ),
    path="/v1/audio/transcriptions",
)
async def test_any_multipart_form(proxy: Stack, form: tuple[bytes, bytes], path: str) -> None:
    content_type, body = form
    head = build_request("POST", path, headers=[("content-type", content_type)], body=body)
    await exchange(proxy, head)


# --- model names ------------------------------------------------------------------------------

NAMES = (
    st.sampled_from(REGISTERED)
    | st.text(min_size=1, max_size=300)
    | st.text(alphabet="$`'\"\\;|&<>(){}[]*?~!#%^ \t\n/.", min_size=1, max_size=40)
)


@PROPERTY
@given(name=NAMES)
@example(name="x" * 100_000)
@example(name="../../sleep")
@example(name="alpha\x00")
async def test_any_model_name_in_a_body(proxy: Stack, name: str) -> None:
    body = encoded(chat(name, max_tokens=2))
    reply = await send(proxy, build_request("POST", "/v1/chat/completions", body=body))
    check_reply(reply, from_upstream=False)
    if name in REGISTERED:
        assert reply.status == 200, reply
        assert reply.json()["model"] == name
    elif len(name) > 256:
        assert reply.status == 400 and openai_error(reply)["param"] == "model", reply
    else:
        assert reply.status == 404 and openai_error(reply)["code"] == "model_not_found", reply


@PROPERTY
@given(name=NAMES, safe=st.sampled_from(["", "/", "/%"]))
@example(name="x" * 100_000, safe="")
@example(name=SLASHED, safe="/")
@example(name="alpha/../../sleep", safe="/")
@example(name="%2e%2e/%2e%2e/sleep", safe="/%")
@example(name="..", safe="")
async def test_any_model_id_in_the_models_path(proxy: Stack, name: str, safe: str) -> None:
    """`GET /v1/models/{id}`: the id however encoded, slashes and dot segments included."""
    target = "/v1/models/" + quote(name, safe=safe)
    try:
        reply = await send(proxy, build_request("GET", target))
    except NoReply:
        # Only an id that is not a valid URL once sent raw (`safe` kept a bare `%`) may be
        # refused by the server without an answer.
        assert "%" in safe
        return
    check_reply(reply, from_upstream=False)
    if reply.status == 200:
        card = reply.json()
        if card.get("object") == "list":  # an id that decodes to nothing is the list itself
            assert {m["id"] for m in card["data"]} == set(REGISTERED)
        else:
            assert card["id"] in REGISTERED and card["object"] == "model"
    elif reply.body != b"Invalid HTTP request received.":
        assert reply.status == 404 and len(reply.body) < 2048, reply
    if name in REGISTERED and "/." not in name and safe != "/%":
        assert reply.status == 200 and reply.json()["id"] == name, reply


# --- operator paths and path tricks -----------------------------------------------------------

PREFIXES = [
    "",
    "/v1/..",
    "/v1/.",
    "/v1/%2e%2e",
    "/v1/%2E.",
    "/v1/chat/completions/../..",
    "/v1/models/..%2f..",
    "/v1/x%2f..%2f..",
    "/v1/chat/completions/%2e%2e/%2e%2e",
    "/v1//..",
    "//v1/..",
]


@st.composite
def operator_targets(draw: st.DrawFn) -> str:
    """An operator path behind dot segments, percent-encoding, slashes, queries and params."""
    path = draw(st.sampled_from(OPERATOR_PATHS))
    if path.startswith("/v1/") and draw(st.booleans()):
        prefix = draw(st.sampled_from(["/v1/.", "/v1/x/..", "/v1/%2e", "/v1//"]))
        path = prefix + path[3:]
    else:
        path = draw(st.sampled_from(PREFIXES)) + path
    # Percent-encode some of the characters (any character may be sent encoded).
    mask = draw(st.lists(st.booleans(), min_size=len(path), max_size=len(path)))
    path = "".join(
        f"%{ord(c):02X}" if encode and c not in "/" else c
        for c, encode in zip(path, mask, strict=True)
    )
    suffix = draw(st.sampled_from(["", "/", "//", "?model=alpha", "#x", ";x", "/.", "%00", "%20"]))
    return path + suffix


@PROPERTY
@given(target=operator_targets(), method=st.sampled_from(["POST", "GET", "PUT"]))
@example(target="/v1/load_lora_adapter", method="POST")
@example(target="/v1/%6coad_lora_adapter", method="POST")
@example(target="/v1/../sleep", method="POST")
@example(target="/v1/%2e%2e/sleep", method="POST")
@example(target="/v1/chat/completions/../../v1/unload_lora_adapter", method="POST")
async def test_operator_paths_never_reach_an_upstream(
    proxy: Stack, target: str, method: str
) -> None:
    body = encoded(chat("alpha", lora_name="x", lora_path="/etc"))
    head = build_request(method, target, headers=[("content-type", "application/json")], body=body)
    before = proxy.upstream_requests()
    try:
        reply = await send(proxy, head)
    except NoReply:
        return
    check_reply(reply, from_upstream=proxy.upstream_requests() != before)
    assert reply.status >= 300 or "/models" in target, reply
    assert_no_operator_path_reached(proxy)


@pytest.mark.parametrize(
    "target", ["/v1/load_lora_adapter/", "/v1//unload_lora_adapter", "/v1/load_lora_adapter//"]
)
async def test_operator_paths_with_extra_slashes_are_not_forwarded_either(
    proxy: Stack, target: str
) -> None:
    before = len(proxy.upstream_paths())
    body = encoded(chat("alpha", lora_name="x", lora_path="/etc"))
    await send(proxy, build_request("POST", target, body=body))
    forwarded = proxy.upstream_paths()[before:]
    assert [p for p in forwarded if loosely_routed_path(p) in OPERATOR_PATHS] == []


@pytest.mark.parametrize("path", OPERATOR_PATHS)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_each_operator_path_is_a_404_and_reaches_nothing(
    proxy: Stack, path: str, method: str
) -> None:
    before = len(proxy.upstream_paths())
    body = encoded(chat("alpha")) if method == "POST" else None
    reply = await send(proxy, build_request(method, path, body=body))
    assert reply.status == 404, reply
    assert openai_error(reply)["code"] == "not_found"
    assert len(proxy.upstream_paths()) == before


@PROPERTY
@given(
    segments=st.lists(
        st.sampled_from(
            ["v1", "chat", "completions", "..", ".", "", "%2e%2e", "%2F", "models", "x"]
        ),
        min_size=1,
        max_size=6,
    ),
    method=st.sampled_from(["POST", "GET"]),
)
async def test_dot_segments_and_encodings_on_proxied_paths(
    proxy: Stack, segments: list[str], method: str
) -> None:
    target = "/" + "/".join(segments)
    head = build_request(
        method, target, headers=[("content-type", "application/json")], body=encoded(chat("alpha"))
    )
    before = len(proxy.upstream_paths())
    try:
        reply = await send(proxy, head)
    except NoReply:
        return
    check_reply(reply, from_upstream=len(proxy.upstream_paths()) != before)
    for path in proxy.upstream_paths()[before:]:
        assert "/../" not in path + "/" and "/./" not in path + "/", path
    assert_no_operator_path_reached(proxy)


# --- bodies over the limit, sent slowly -------------------------------------------------------

CHUNK = 16 * 1024


async def test_chunked_body_over_the_limit_trickled_is_refused_as_it_crosses_the_limit(
    proxy: Stack,
) -> None:
    """16 KiB every 5 ms, chunked (no Content-Length to refuse up front): a 413 as soon as the
    limit is crossed, while the client is still sending, and nothing reaches an upstream."""
    before = proxy.upstream_requests()
    head = build_request(
        "POST",
        "/v1/chat/completions",
        headers=[("content-type", "application/json"), ("transfer-encoding", "chunked")],
    )
    body = b'{"model": "alpha", "pad": "' + b"x" * (LIMIT * 4) + b'"}'
    reply = await send(proxy, head, chunked(body, CHUNK), pause=0.005, timeout=20)
    assert reply.status == 413 and openai_error(reply)["code"] == "request_too_large"
    # Refused at the limit, give or take what the sockets' buffers held: not at the end.
    assert reply.sent_before_reply < len(head) + 2 * LIMIT
    assert proxy.upstream_requests() == before


async def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    proxy: Stack,
) -> None:
    head = build_request(
        "POST",
        "/v1/chat/completions",
        headers=[("content-type", "application/json"), ("content-length", str(LIMIT + 1))],
    )
    # The body would follow at a byte per 50 ms; the answer must not wait for it.
    reply = await send(proxy, head, [b"{"] * 20, pause=0.05, timeout=5)
    assert reply.status == 413 and openai_error(reply)["code"] == "request_too_large"
    assert reply.sent_before_reply == len(head)


async def test_body_under_the_limit_trickled_slowly_is_served(proxy: Stack) -> None:
    body = encoded(chat("alpha", max_tokens=2, pad="y" * 2000))
    head = build_request(
        "POST", "/v1/chat/completions", headers=[("content-length", str(len(body)))]
    )
    pieces = [body[i : i + 64] for i in range(0, len(body), 64)]
    reply = await send(proxy, head, pieces, pause=0.005, timeout=20)
    assert reply.status == 200 and reply.json()["model"] == "alpha"


async def test_client_leaving_mid_body_leaves_nothing_behind(proxy: Stack) -> None:
    before = Snapshot.take()
    head = build_request(
        "POST", "/v1/chat/completions", headers=[("content-length", str(LIMIT // 2))]
    )
    with pytest.raises(TimeoutError):
        await send_raw(proxy.port, head, [b'{"model": "alpha", '], timeout=0.3)
    await assert_no_leak(before)
    status = await proxy.status()
    assert status["requests_in_flight"] == {} and status["requests_waiting"] == {}
