"""The two benchmark clients that wrk cannot be: raw asyncio sockets, no HTTP library, so that
the client's own cost is small and the same for every path it measures.

    python benchmarks/clients.py ttfe URL --requests 300 --events 5 --gap-us 2000
        One keep-alive connection, streaming requests one after another: prints the time to
        the first event and to the end of each stream (JSON on the last line).
    python benchmarks/clients.py hold URL --streams 1000 --gap-us 1000000
        Opens that many slow streams at once, waits until every one has had its first event,
        prints `READY ok failed`, holds them until a line arrives on stdin (or --hold-timeout),
        then closes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from urllib.parse import urlsplit

BODY_TEMPLATE = (
    '{"messages":[{"role":"user","content":"Write one short sentence about benchmarks."}],'
    '"model":"%s","max_tokens":64,"stream":true}'
)
END_OF_CHUNKED = b"\r\n0\r\n\r\n"


def request_bytes(url: str, model: str, events: int, gap_us: int) -> bytes:
    parts = urlsplit(url)
    body = (BODY_TEMPLATE % model).encode()
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "Content-Type: application/json\r\n"
        "Authorization: Bearer sk-benchmark\r\n"
        f"X-Bench-Events: {events}\r\n"
        f"X-Bench-Gap-Us: {gap_us}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_stream(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Read one chunked SSE response; returns (time of first event, headers)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed before the headers")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    first = time.perf_counter() if b"data:" in body else 0.0
    while not first:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed before the first event")
        body += data
        if b"data:" in body:
            first = time.perf_counter()
    tail = body[-16:]
    while not tail.endswith(END_OF_CHUNKED):
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed mid-stream")
        tail = (tail + data)[-16:]
    return first, head


async def ttfe(url: str, model: str, requests: int, warmup: int, events: int, gap_us: int) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    payload = request_bytes(url, model, events, gap_us)
    firsts: list[float] = []
    totals: list[float] = []
    for i in range(warmup + requests):
        started = time.perf_counter()
        writer.write(payload)
        first, _ = await read_stream(reader)
        ended = time.perf_counter()
        if i >= warmup:
            firsts.append((first - started) * 1e6)
            totals.append((ended - started) * 1e6)
    writer.close()
    firsts.sort()
    print(
        json.dumps(
            {
                "requests": requests,
                "ttfe_p50_us": statistics.median(firsts),
                "ttfe_p99_us": firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))],
                "stream_p50_us": statistics.median(totals),
                "samples_us": [round(x, 1) for x in firsts],
            }
        )
    )


async def hold(
    url: str, model: str, streams: int, gap_us: int, events: int, hold_timeout: float
) -> None:
    parts = urlsplit(url)
    payload = request_bytes(url, model, events, gap_us)
    opening = asyncio.Semaphore(100)  # do not overflow the listen backlog
    writers: list[asyncio.StreamWriter] = []
    failures: list[str] = []

    async def one() -> None:
        try:
            async with opening:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writers.append(writer)
            writer.write(payload)
            buf = b""
            while b"data:" not in buf:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the first event")
                buf += data
            if not buf.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(buf.split(b"\r\n", 1)[0].decode(errors="replace"))
        except (OSError, ConnectionError) as exc:
            failures.append(str(exc))

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(streams))), 60)
    except TimeoutError:
        failures.append("timed out opening the streams")
    print(f"READY {streams - len(failures)} {len(failures)}", flush=True)
    if failures:
        print(f"first failure: {failures[0]}", file=sys.stderr)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), hold_timeout)
    for writer in writers:
        writer.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("ttfe", "hold"))
    parser.add_argument("url", help="e.g. http://127.0.0.1:8001/v1/chat/completions")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--gap-us", type=int, default=1_000_000)
    parser.add_argument("--hold-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.command == "ttfe":
        asyncio.run(
            ttfe(args.url, args.model, args.requests, args.warmup, args.events, args.gap_us)
        )
    else:
        asyncio.run(
            hold(args.url, args.model, args.streams, args.gap_us, args.events, args.hold_timeout)
        )


if __name__ == "__main__":
    main()
