"""The process-group leader between the proxy and one model server. Run as a script, never
imported: `python -I -S _local_supervisor.py PROXY_PID -- COMMAND...` (stdlib only, so it
starts in a few milliseconds and does not depend on the proxy's packages).

Why it exists: Linux's parent-death signal (`PR_SET_PDEATHSIG`) reaches only a process's
direct child, but the processes holding GPU memory are often grandchildren (vLLM's engine core
and tensor-parallel workers). This program leads the server's process group and kills the
whole group as soon as the proxy is gone, however it went, SIGKILL included:

- its stdin is a pipe whose only writer is the proxy; the kernel closes it when the proxy dies,
  and the read returns EOF;
- on Linux it also asks for SIGTERM as its own parent-death signal, and takes a SIGTERM that
  arrives after its parent changed as the proxy's death.

A SIGTERM while the proxy is alive is the proxy's graceful stop: the server got the same signal
(it went to the whole group), so the supervisor only waits for the server and exits with the
server's status; the proxy sees the server's own exit code or signal. The server itself gets
`PR_SET_PDEATHSIG` = SIGKILL, in case the supervisor is killed on its own (the OOM killer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

PR_SET_PDEATHSIG = 1
#: Exit statuses a shell uses for "cannot execute" and "not found".
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send `signum` when our parent dies (Linux only; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415 - only where prctl exists

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        print(f"vllm-chill: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}", file=sys.stderr)


def kill_group() -> None:
    """SIGKILL the whole process group, this supervisor included."""
    os.killpg(0, signal.SIGKILL)


def watch_parent_pipe() -> None:
    """Block on stdin; EOF means the proxy (the pipe's only writer) is gone."""
    while True:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            kill_group()
            return


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: _local_supervisor.py PROXY_PID -- COMMAND...", file=sys.stderr)
        return 2
    proxy_pid, command = int(argv[0]), argv[2:]
    # Signals blocked in the spawning thread would be inherited and keep SIGTERM from the server.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != proxy_pid:
        return 1  # the proxy died before the death signal was armed

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if os.getppid() != proxy_pid:
            kill_group()  # parent-death signal: the proxy is gone
        # Otherwise the proxy stops the group gracefully: wait for the server's exit below.

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # preexec_fn is safe here: this process has a single thread until the watcher starts.
        server = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL),  # noqa: PLW1509
        )
    except OSError as exc:
        print(f"vllm-chill: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
    threading.Thread(target=watch_parent_pipe, name="proxy-watch", daemon=True).start()
    status = server.wait()
    if status < 0:  # mirror the signal so the proxy reports "killed by SIGKILL" and the like
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
