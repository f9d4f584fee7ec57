"""A stand-in for `vllm serve` (stdlib only, so it starts in a blink) for the local backend's
tests. It takes vLLM's flags (positional model, `--served-model-name`, `--host`, `--port`,
`--api-key`; everything else is accepted and ignored), prints start-up lines, binds its port
only once "loaded" (like vLLM), and answers `/health`, `/v1/models` and
`/v1/chat/completions` (JSON and SSE) naming its served model.

Misbehaviours, carried by a model's `extraArgs`:
  --standin-load-time SECONDS        how long "loading" takes (default 0.2)
  --standin-crash-during-load        print a CUDA OOM traceback and exit 1 while loading
  --standin-crash-after-ready SECS   exit 3 this long after the first /v1/models answer (when
                                     the backend deems it ready)
  --standin-ignore-sigterm           survive SIGTERM (only SIGKILL stops it)
  --standin-spawn-child              start a grandchild that ignores SIGTERM and sleeps

A chat request's `standin_chunk_delay` (seconds) spaces its streamed chunks: a long answer.

`/v1/models` carries a `standin` object with the argv it got, its pids and its
`CUDA_VISIBLE_DEVICES`, so that tests can check the exact words, where it was placed, and look
for leftover processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--model", dest="model_flag")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key")
    parser.add_argument("--standin-load-time", type=float, default=0.2)
    parser.add_argument("--standin-crash-during-load", action="store_true")
    parser.add_argument("--standin-crash-after-ready", type=float)
    parser.add_argument("--standin-ignore-sigterm", action="store_true")
    parser.add_argument("--standin-spawn-child", action="store_true")
    parser.add_argument("--standin-wake-time", type=float, default=0.3)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    return args


def say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    args = parse(sys.argv[1:])
    model = args.model or args.model_flag or "facebook/opt-125m"
    served = (args.served_model_name or [model])[0]
    info: dict[str, Any] = {
        "argv": sys.argv[1:],
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgrp(),
        "grandchild_pid": None,
        #: What the backend placed it on (None: the variable was not set for it).
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        #: vLLM's sleep routes exist only in its development mode.
        "dev_mode": os.environ.get("VLLM_SERVER_DEV_MODE") == "1",
        "sleep_mode": args.enable_sleep_mode,
        "wake_time": args.standin_wake_time,
        #: Each /sleep call as (level, mode, requests in flight when it came).
        "sleep_calls": [],
        "sleeping": False,
        "in_flight": 0,
    }

    if args.standin_ignore_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: say("standin: ignoring SIGTERM"))
    else:

        def graceful(*_: object) -> None:
            say("standin: SIGTERM received, shutting down")
            os._exit(0)

        signal.signal(signal.SIGTERM, graceful)

    if args.standin_spawn_child:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(3600)",
            ]
        )
        info["grandchild_pid"] = child.pid
    say(
        f"standin pid={info['pid']} ppid={info['ppid']} pgid={info['pgid']} "
        f"grandchild={info['grandchild_pid']}"
    )
    say(f"INFO vLLM API server version 0.0.0-standin; args: {sys.argv[1:]}")
    say(f"INFO Loading model {model} as {served!r}")

    if args.standin_crash_during_load:
        time.sleep(0.1)
        say("Traceback (most recent call last):")
        say('  File "vllm/worker/gpu_model_runner.py", line 1234, in load_model')
        say(
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
            "GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free."
        )
        sys.exit(1)
    time.sleep(args.standin_load_time)

    crash_timer: threading.Timer | None = None
    if args.standin_crash_after_ready is not None:

        def crash() -> None:
            say("ERROR standin: engine core died unexpectedly")
            os._exit(3)

        crash_timer = threading.Timer(args.standin_crash_after_ready, crash)
        crash_timer.daemon = True
    handler = make_handler(served, model, args.api_key, info, crash_timer)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    say(f"INFO Started server process; listening on http://{args.host}:{args.port}")

    server.serve_forever()


def make_handler(
    served: str,
    model: str,
    api_key: str | None,
    info: dict[str, Any],
    crash_timer: threading.Timer | None,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the proxy's log for what matters

        def send_json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self) -> bool:
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self.send_json(401, {"error": {"message": "Unauthorized", "code": 401}})
            return False

        def dev_route(self) -> bool:
            """vLLM's /sleep, /wake_up and /is_sleeping: 404 outside its development mode."""
            path, _, query = self.path.partition("?")
            if path not in ("/sleep", "/wake_up", "/is_sleeping"):
                return False
            if not info["dev_mode"]:
                self.send_json(404, {"detail": "Not Found"})
                return True
            if path == "/is_sleeping":
                self.send_json(200, {"is_sleeping": info["sleeping"]})
                return True
            if not info["sleep_mode"]:
                self.send_json(400, {"error": {"message": "Sleep mode is not enabled."}})
                return True
            params = dict(part.partition("=")[::2] for part in query.split("&") if part)
            if path == "/sleep":
                level, mode = int(params.get("level", "1")), params.get("mode", "abort")
                info["sleep_calls"].append([level, mode, info["in_flight"]])
                info["sleeping"] = True
            else:
                if info["sleeping"]:
                    time.sleep(info["wake_time"])
                info["sleeping"] = False
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def do_GET(self) -> None:
            if self.dev_route():
                return
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                if self.authorized():
                    entry = {"id": served, "object": "model", "owned_by": "standin", "root": model}
                    self.send_json(200, {"object": "list", "data": [entry], "standin": info})
                    if crash_timer is not None:
                        with contextlib.suppress(RuntimeError):  # already started
                            crash_timer.start()  # ready in the backend's eyes from now on
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.dev_route():
                return
            info["in_flight"] += 1  # answers being generated, for the sleep calls' record
            try:
                self.post()
            finally:
                info["in_flight"] -= 1

        def post(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/chat/completions":
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})
                return
            if not self.authorized():
                return
            if body.get("model") != served:
                message = f"The model `{body.get('model')}` does not exist."
                self.send_json(404, {"error": {"message": message, "code": 404}})
                return
            text = f"hello from {served}"
            if not body.get("stream"):
                self.send_json(
                    200,
                    {
                        "id": "chatcmpl-standin",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": served,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                    },
                )
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            pause = float(body.get("standin_chunk_delay", 0))  # a long answer, for drain tests
            for index, piece in enumerate(["hello ", "from ", served]):
                if index:
                    time.sleep(pause)
                delta: dict[str, Any] = {"content": piece}
                if index == 0:
                    delta["role"] = "assistant"
                chunk = {
                    "id": "chatcmpl-standin",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": served,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


if __name__ == "__main__":
    main()
