"""`LocalProcessBackend`: a model server per loaded model, each a child process group.

For the machine with GPUs and no cluster. Given GPUs (`gpus`, `--gpus`), several models run at
once where they fit: the scheduler places each one, and its process gets `CUDA_VISIBLE_DEVICES`
set to the GPUs it was given, in order (nothing else about its environment changes). Without
GPUs there is no accounting: one model at a time, the environment untouched. Each load starts
the `--command` template (see `local_command`) on a free loopback port and is ready when
`/health` answers 200 and `/v1/models` lists the served name with the model's `modelName` as its
`root` (what vLLM reports as the model it loaded). A server that lists the served name with
another `root` loaded something else (a `--command` with a fixed model, say): the load fails at
once. The server's output is logged line by line under `vllm_chill.backends.local`, prefixed
with the served name, and its last lines are the reason of a failed load, because a crash during
load (`CUDA out of memory`, `unrecognized arguments`) is what the operator must see, and see at
once rather than after `--model-switch-timeout`.

What is guaranteed about leftover processes:

- The server runs under a tiny supervisor (`_local_supervisor.py`) that leads a new session and
  process group. Stopping (unload, a switch, `stop()`) sends SIGTERM to the group, SIGKILL after
  `grace_period`, then SIGKILL to whatever is left of the group, and returns only once no live
  process of the group remains; so a switch starts the next model only after the old one's
  processes (and their GPU memory) are gone.
- If the proxy dies, however it dies (SIGKILL included), the supervisor sees it (the pipe on its
  stdin closes; on Linux also a parent-death signal) and SIGKILLs the group at once. The server
  also gets SIGKILL as its own parent-death signal in case the supervisor alone is killed.
- Not covered: a descendant that leaves the process group (`setsid`, a daemonizing helper);
  grandchildren left behind when the supervisor *and* the server are SIGKILLed together from
  outside; and zombies when the proxy runs as PID 1 in a container without an init that reaps
  orphans (run it with `--init`/tini). Parent-death signals exist only on Linux; elsewhere the
  stdin pipe alone detects the proxy's death.

Needs a POSIX system. The background tasks (output readers, exit watchers) live in the
session's task group.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import httpx
from anyio.abc import Process, TaskGroup

from vllm_chill._model import VLLMModel
from vllm_chill._placement import Capacity, GpuPool, Placement, SingleSlot
from vllm_chill.backends._base import LoadedModel, LoadError, LostCallback, ProgressCallback
from vllm_chill.backends._sleep_api import is_sleeping, post_sleep, post_wake
from vllm_chill.backends.local._command import DEFAULT_COMMAND, CommandTemplate
from vllm_chill.observability._logs import get_logger
from vllm_chill.observability._redact import SECRET_FLAG

log = get_logger(__name__)

SUPERVISOR = Path(__file__).with_name("_supervisor.py")
#: After SIGKILL, how long the kernel may take to tear the group down (a process releasing GPU
#: memory can sit in uninterruptible sleep for a while). Beyond it we log and carry on.
KILL_TIMEOUT = 15.0
#: How long the last output lines may take to arrive once the group is gone.
OUTPUT_DRAIN_TIMEOUT = 2.0
#: One readiness request; a server that accepts but does not answer is retried after this.
PROBE_TIMEOUT = 5.0
POLL_INITIAL = 0.05
POLL_MAX = 0.25
#: Longest one /sleep or /wake_up call may take (the weights of a large model move to or from
#: host memory meanwhile); the scheduler bounds the whole sleep and wake as well.
SLEEP_CALL_TIMEOUT = 120.0
#: A "line" longer than this (a progress bar without line breaks) is cut, to bound memory.
MAX_LINE = 16 * 1024
#: Progress bars (tqdm) redraw with a carriage return; each redraw is a line of its own.
_LINE_BREAK = re.compile(rb"\r\n|[\r\n]")
#: Environment variables whose value is a secret (`HF_TOKEN`, `OPENAI_API_KEY`).
_SECRET_ENV = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
MIN_ENV_SECRET = 8


class LocalProcessBackend:
    """Runs a model server per loaded model as a child process group (see the module
    docstring); `gpus` are the GPU ids to place models on (none: one model at a time).

    `env` is added to the proxy's environment for the server (e.g. `CUDA_VISIBLE_DEVICES`);
    `PYTHONUNBUFFERED=1` is set unless `env` says otherwise, so Python servers' output arrives
    as it is written. `api_key` is sent to `/v1/models` while waiting for readiness, for
    servers started with `--api-key`. Raises `ValueError` for a bad template or setting."""

    def __init__(
        self,
        command: str = DEFAULT_COMMAND,
        *,
        grace_period: float = 10.0,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        log_lines: int = 40,
        api_key: str | None = None,
        gpus: Sequence[str] = (),
    ) -> None:
        if not hasattr(os, "killpg"):
            raise RuntimeError("the local backend needs a POSIX system (process groups)")
        if grace_period < 0:
            raise ValueError(f"grace_period must be >= 0, not {grace_period}")
        if log_lines < 1:
            raise ValueError(f"log_lines must be >= 1, not {log_lines}")
        self.template = CommandTemplate.parse(command)
        self.grace_period = grace_period
        self.host = host
        self._env = dict(env or {})
        self._log_lines = log_lines
        self._api_key = api_key or None
        #: GPU ids to place models on; none: no accounting, one model at a time.
        self.capacity: Capacity = GpuPool(tuple(gpus)) if gpus else SingleSlot()
        self._servers: dict[str, _Server] = {}
        #: Models whose server sleeps (vLLM's sleep mode): kept when another one loads.
        self.asleep: set[str] = set()
        self._on_lost: LostCallback | None = None
        self._tg: TaskGroup | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"LocalProcessBackend(command={self.template.text!r})"

    # -- Backend ---------------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, on_lost: LostCallback) -> AsyncIterator[LoadedModel | None]:
        """The task group that owns the output readers and exit watchers lives as long as the
        session. Nothing is adopted: a model server never outlives the proxy that started it,
        and leaving the session stops it (shielded and bounded)."""
        if self._tg is not None:
            raise RuntimeError("LocalProcessBackend already has a session open")
        self._on_lost = on_lost
        self._closing = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    yield None
                finally:
                    await self._stop_all()
                    tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._on_lost = None
            # Reached with a server still running only when the event loop is torn down
            # around the session (Ctrl-C in a script). Closing the process transport may then
            # SIGKILL the supervisor alone, before it could kill the server's workers: kill
            # the whole group first.
            for server in list(self._servers.values()):
                _signal_group(server.pgid, signal.SIGKILL)

    async def _stop_all(self) -> None:
        """Stop every server, together (a load in progress then fails at once). Shielded and
        bounded."""
        with anyio.CancelScope(shield=True):
            self._closing = True
            with anyio.move_on_after(self.grace_period + KILL_TIMEOUT + 5):
                async with anyio.create_task_group() as tg:
                    for server in list(self._servers.values()):
                        tg.start_soon(self._stop_server, server)

    async def load(
        self,
        model: VLLMModel,
        progress: ProgressCallback,
        *,
        placement: Placement | None = None,
        replacing: Sequence[str] = (),
    ) -> LoadedModel:
        tg = self._tg
        if tg is None or self._closing:
            raise RuntimeError("LocalProcessBackend has no session open")
        name = model.served_model_name
        current = self._servers.get(name)
        if current is not None:
            if current.model == model and current.ready and not current.exited.is_set():
                return current.loaded()
            await self._stop_server(current)  # its definition changed
        # Without GPU accounting one model runs at a time; with it, only the drained ones go.
        one_slot = isinstance(self.capacity, SingleSlot)
        for other in [
            s
            for s in self._servers.values()
            if (one_slot and s.name not in self.asleep) or s.name in replacing
        ]:
            progress(f"stopping {other.name}")
            await self._stop_server(other)
        progress("starting process")
        server = await self._spawn(model, None if one_slot else placement)
        try:
            if self._closing:
                raise LoadError("the local backend is stopping")
            tg.start_soon(self._read_output, server)
            tg.start_soon(self._watch_exit, server)
            await self._wait_ready(server, progress)
        except BaseException:
            await self._stop_server(server)  # cancelled or failed: leave nothing behind
            raise
        server.ready = True
        log.info("[%s] ready at %s", server.name, server.base_url)
        return server.loaded()

    async def sleep(self, model: str, level: int) -> int | None:
        """`POST /sleep?level=..&mode=wait` (what is in flight finishes first; the scheduler
        drained it anyway), then `/is_sleeping` until it says so. Returns the resident memory
        of the server's whole process group once asleep: the host RAM its weights now hold."""
        server = self._servers[model]
        async with self._dev_client(server) as client:
            await post_sleep(client, level)
            await self._until_sleeping(server, client, sleeping=True)
        self.asleep.add(model)
        memory = await anyio.to_thread.run_sync(_group_rss, server.pgid)
        log.info("[%s] asleep, holding %.1f GiB of host memory", model, memory / 2**30)
        return memory

    async def wake(self, model: str, progress: ProgressCallback) -> LoadedModel:
        server = self._servers[model]
        progress("waking")
        async with self._dev_client(server) as client:
            await post_wake(client)
            await self._until_sleeping(server, client, sleeping=False)
            progress("waiting for /v1/models")
            await self._poll(server, lambda: _lists_model(client, server))
        self.asleep.discard(model)
        log.info("[%s] awake at %s", model, server.base_url)
        return server.loaded()

    def _dev_client(self, server: _Server) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        # /sleep and /wake_up answer once the weights have moved (seconds for large models).
        return httpx.AsyncClient(
            base_url=server.base_url, headers=headers, timeout=SLEEP_CALL_TIMEOUT, trust_env=False
        )

    async def _until_sleeping(
        self, server: _Server, client: httpx.AsyncClient, *, sleeping: bool
    ) -> None:
        async def settled() -> bool:
            return await is_sleeping(client) is sleeping

        await self._poll(server, settled)

    async def unload(self, model: str | None = None) -> None:
        servers = [s for s in self._servers.values() if model is None or s.name == model]
        for server in servers:
            await self._stop_server(server)

    async def check(self) -> bool:
        return True

    # -- starting --------------------------------------------------------------------------

    async def _spawn(self, model: VLLMModel, placement: Placement | None) -> _Server:
        port = _free_port(self.host)
        argv = self.template.render(model, port)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self._env}
        if placement is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(placement.units)
        if model.enable_sleep_mode:
            # vLLM serves /sleep and /wake_up only in its development mode. The server listens
            # on loopback, and the proxy never forwards those paths.
            env["VLLM_SERVER_DEV_MODE"] = "1"
        secrets = _secret_values(argv) | _secret_env_values(env)
        if self._api_key:
            secrets.add(self._api_key)
        name = model.served_model_name
        where = f" on GPUs {','.join(placement.units)}" if placement is not None else ""
        log.info(
            "[%s] starting%s: %s", name, where, shlex.join(_redact(word, secrets) for word in argv)
        )
        supervised = [sys.executable, "-I", "-S", str(SUPERVISOR), str(os.getpid()), "--", *argv]
        try:
            # Shielded: a cancellation half-way through would leave asyncio to SIGKILL the
            # supervisor alone; once it returns, the caller's cleanup owns the process.
            with anyio.CancelScope(shield=True):
                process = await anyio.open_process(
                    supervised,
                    stdin=subprocess.PIPE,  # its EOF tells the supervisor the proxy is gone
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise LoadError(f"cannot start the model server: {exc}") from exc
        host = f"[{self.host}]" if ":" in self.host else self.host
        server = _Server(model, process, f"http://{host}:{port}", self._log_lines, secrets)
        self._servers[name] = server
        return server

    async def _wait_ready(self, server: _Server, progress: ProgressCallback) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=headers, timeout=PROBE_TIMEOUT, trust_env=False
        ) as client:
            progress("waiting for /health")
            await self._poll(server, lambda: _health_ok(client))
            progress("waiting for /v1/models")
            await self._poll(server, lambda: _lists_model(client, server))

    async def _poll(self, server: _Server, probe: Callable[[], Awaitable[bool]]) -> None:
        """Probe with a short backoff until it succeeds; fail the moment the process exits."""
        delay = POLL_INITIAL
        while True:
            if server.exited.is_set():
                await self._fail_load(server)
            if await probe():
                return
            with anyio.move_on_after(delay):
                await server.exited.wait()
            delay = min(delay * 2, POLL_MAX)

    async def _fail_load(self, server: _Server) -> NoReturn:
        if server.stopping:
            raise LoadError("the local backend stopped the model server while it was loading")
        await self._stop_server(server)  # kills what is left and collects the last lines
        reason = server.describe_exit("during load")
        log.error("[%s] %s", server.name, reason)
        raise LoadError(reason)

    # -- background tasks ------------------------------------------------------------------

    async def _read_output(self, server: _Server) -> None:
        try:
            await server.read_output()
        except Exception:  # a failing reader must not take the task group down
            log.exception("[%s] reading the server's output failed", server.name)

    async def _watch_exit(self, server: _Server) -> None:
        """Notice a server that dies after it was ready, so that the next request reloads."""
        try:
            await server.process.wait()
            server.exited.set()
            if server.stopping or not server.ready:
                return  # a stop or a load in progress handles it
            await self._stop_server(server)  # its workers may still hold GPU memory
            reason = server.describe_exit("after it was ready")
            log.error("[%s] %s", server.name, reason)
            if self._on_lost is not None:
                self._on_lost(reason, model=server.name)
        except Exception:
            log.exception("[%s] watching the server process failed", server.name)

    # -- stopping --------------------------------------------------------------------------

    async def _stop_server(self, server: _Server) -> None:
        """Stop `server` and wait until its whole process group is gone. Idempotent; shielded,
        so that a cancelled load still leaves nothing behind; bounded in time."""
        with anyio.CancelScope(shield=True):
            async with server.stop_lock:
                if not server.stopped.is_set():
                    server.stopping = True
                    await self._terminate(server)
                    server.stopped.set()
        if self._servers.get(server.name) is server:
            del self._servers[server.name]
            self.asleep.discard(server.name)

    async def _terminate(self, server: _Server) -> None:
        name, pgid = server.name, server.pgid
        if not server.exited.is_set():
            log.info("[%s] stopping: SIGTERM to process group %d", name, pgid)
            _signal_group(pgid, signal.SIGTERM)
            with anyio.move_on_after(self.grace_period):
                await server.wait_exit()
            if not server.exited.is_set():
                log.warning(
                    "[%s] still running %gs after SIGTERM: SIGKILL to process group %d",
                    name,
                    self.grace_period,
                    pgid,
                )
                _signal_group(pgid, signal.SIGKILL)
        with anyio.move_on_after(KILL_TIMEOUT) as deadline:
            await server.wait_exit()
            # Whatever outlived the server (workers that ignored SIGTERM, or were orphaned by a
            # crash) dies now; the next model starts only once its GPU memory is free.
            _signal_group(pgid, signal.SIGKILL)
            await _wait_group_gone(pgid)
        if deadline.cancelled_caught:
            log.error(
                "[%s] process group %d still has live processes %gs after SIGKILL",
                name,
                pgid,
                KILL_TIMEOUT,
            )
        with anyio.move_on_after(OUTPUT_DRAIN_TIMEOUT):
            await server.output_closed.wait()
        await server.close_streams()
        log.info("[%s] stopped (%s)", name, server.exit_status())


class _Server:
    """One model server: its supervisor process, its recent output, and where it is in its
    life (exited, being stopped, stopped)."""

    def __init__(
        self,
        model: VLLMModel,
        process: Process,
        base_url: str,
        log_lines: int,
        secrets: set[str],
    ) -> None:
        self.model = model
        self.name = model.served_model_name
        self.process = process
        self.pgid = process.pid  # start_new_session: the supervisor leads its own group
        self.base_url = base_url
        self.output: deque[str] = deque(maxlen=log_lines)
        self.secrets = secrets
        self.exited = anyio.Event()
        self.output_closed = anyio.Event()
        self.stopped = anyio.Event()
        self.stop_lock = anyio.Lock()
        self.ready = False
        self.stopping = False
        #: The server's `/v1/models` entry for the model, once it listed it.
        self.entry: dict[str, Any] | None = None

    def loaded(self) -> LoadedModel:
        return LoadedModel(served_model_name=self.name, base_url=self.base_url, entry=self.entry)

    async def wait_exit(self) -> None:
        """Wait until the supervisor is reaped (callers bound it; the exit watcher may be
        cancelled already when the backend stops)."""
        await self.process.wait()
        self.exited.set()

    async def read_output(self) -> None:
        pending = b""
        try:
            if self.process.stdout is not None:
                async for chunk in self.process.stdout:
                    *lines, pending = _LINE_BREAK.split(pending + chunk)
                    for line in lines:
                        self._add_line(line)
                    if len(pending) > MAX_LINE:
                        self._add_line(pending)
                        pending = b""
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            if pending:
                self._add_line(pending)
            self.output_closed.set()

    def _add_line(self, raw: bytes) -> None:
        line = _redact(raw.decode("utf-8", errors="replace").rstrip(), self.secrets)
        if line.strip():
            self.output.append(line)
            log.info("[%s] %s", self.name, line)

    def exit_status(self) -> str:
        code = self.process.returncode
        if code is None:
            return "process did not exit"
        if code < 0:
            try:
                return f"process was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"process was killed by signal {-code}"
        return f"process exited with status {code}"

    def describe_exit(self, when: str) -> str:
        """The load-failure or lost reason: how it ended, and what it printed last."""
        reason = f"{self.exit_status()} {when}"
        if self.output:
            reason += "; last output:\n" + "\n".join(self.output)
        return reason

    async def close_streams(self) -> None:
        if self.exited.is_set():
            await self.process.aclose()
            return
        # Still not reaped (stuck in the kernel): close our ends without waiting for it.
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                await stream.aclose()


# -- readiness probes ------------------------------------------------------------------------


async def _health_ok(client: httpx.AsyncClient) -> bool:
    try:
        response = await client.get("/health")
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def _lists_model(client: httpx.AsyncClient, server: _Server) -> bool:
    """Whether the server lists the model under its served name (and then keeps its entry)."""
    served_model_name, model_name = server.name, server.model.model_name
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError:
        return False
    if response.status_code in (401, 403):
        raise LoadError(
            f"/v1/models answered {response.status_code}: the model server requires an API key; "
            "give vllm-chill the same key (--upstream-api-key)"
        )
    if response.status_code != 200:
        return False
    try:
        entries = [e for e in response.json()["data"] if e.get("id") == served_model_name]
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    if not entries:
        return False
    # vLLM's `root` is the model it was started with; a server without the field cannot tell.
    roots = {e["root"] for e in entries if isinstance(e.get("root"), str)}
    if roots and model_name not in roots:
        raise LoadError(
            f"the model server serves {served_model_name!r} from {sorted(roots)[0]!r}, not from "
            f"{model_name!r} (modelName): it loaded another model; check --command"
        )
    server.entry = entries[0]
    return True


# -- processes and ports ---------------------------------------------------------------------


def _free_port(host: str) -> int:
    """A port nothing listens on right now. Another process could take it before the server
    binds it; the server then exits at once and the load fails with its "address in use"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # nothing left in the group
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)


async def _wait_group_gone(pgid: int) -> None:
    """Return once no live (non-zombie) process is in group `pgid`. The kernel offers no event
    for processes that are not our children, hence a short polling backoff."""
    delay = 0.01
    while await anyio.to_thread.run_sync(_group_has_live_members, pgid):
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.2)


def _group_stats(pgid: int) -> Generator[list[bytes], None, None]:
    """The `/proc/<pid>/stat` fields after the command name of every process in a process
    group (Linux): state, ppid, pgrp, ... The command name may contain anything, even ") ",
    so the fields start after its last ")"."""
    with os.scandir("/proc") as entries:  # closed when the caller closes this generator too
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                    stat = stat_file.read()
            except OSError:
                continue  # exited while we looked
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 2 and int(fields[2]) == pgid:
                yield fields


def _group_rss(pgid: int) -> int:
    """Resident memory of every process of a process group, in bytes (Linux; 0 elsewhere)."""
    if not sys.platform.startswith("linux"):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    # rss (pages) is field 24 of stat: index 21 after the command name.
    return sum(int(f[21]) * page for f in _group_stats(pgid) if len(f) > 21)


def _group_has_live_members(pgid: int) -> bool:
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stats = _group_stats(pgid)
    try:
        return any(fields[0] not in (b"Z", b"X") for fields in stats)
    finally:
        stats.close()  # ends the /proc scan now, not when the generator is collected


# -- secrets ---------------------------------------------------------------------------------


def _secret_values(argv: list[str]) -> set[str]:
    """Values of flags like `--api-key`, `--hf-token` (as `--flag value` or `--flag=value`)."""
    secrets: set[str] = set()
    for index, word in enumerate(argv):
        flag, has_value, value = word.partition("=")
        if not SECRET_FLAG.match(flag):  # masked in logs and load-failure reasons
            continue
        if has_value:
            secrets.add(value)
        elif index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            secrets.add(argv[index + 1])
    secrets.discard("")
    return secrets


def _secret_env_values(env: Mapping[str, str]) -> set[str]:
    """Values of variables like `HF_TOKEN` or `OPENAI_API_KEY`, should the server print them.
    Short values are left alone: masking every "1" would make the log unreadable."""
    return {
        value
        for name, value in env.items()
        if _SECRET_ENV.search(name) and len(value) >= MIN_ENV_SECRET
    }


def _redact(text: str, secrets: set[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
