"""Log output for the server: one line per record, as text or JSON, uvicorn's loggers included.

Text lines lead with a UTC timestamp and the level so that they sort and grep well:

    2026-11-27T03:10:00.123Z INFO vllm_chill.scheduler switch phase=loading model=x

JSON lines are one object each (`ts`, `level`, `logger`, `message`, and `exc_info` as a string
when there is a traceback) for log shippers. Secrets given to `configure_logging` are replaced by
`***` in every line, whatever logged them: a last line of defence, since nothing should log them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Literal

#: Loggers that are chatty at INFO (httpx logs every upstream request): WARNING unless debugging.
_NOISY = ("httpx", "httpcore", "watchfiles", "urllib3", "kubernetes", "asyncio")
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
#: Secrets shorter than this are not redacted: replacing every "1" would garble the logs.
_MIN_SECRET = 4


def get_logger(module: str) -> logging.Logger:
    """The logger of `module`, named by its public package: `vllm_chill.backends.local._backend`
    logs as `vllm_chill.backends.local`. Operators filter on these names; private module names
    would leak the layout of the code into their configuration."""
    return logging.getLogger(
        ".".join(part for part in module.split(".") if not part.startswith("_"))
    )


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class _Formatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def traceback(self, record: logging.LogRecord) -> str | None:
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts) or None


class TextFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        trace = self.traceback(record)
        if trace:
            line = f"{line}\n{trace}"
        return self.redact(line)


class JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace = self.traceback(record)
        if trace:
            entry["exc_info"] = trace
        return self.redact(json.dumps(entry, ensure_ascii=False))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it instead of adding a second one."""


def configure_logging(
    level: str,
    fmt: Literal["text", "json"],
    *,
    secrets: Iterable[str] = (),
    access_log: bool | None = None,
) -> None:
    """Send every log record (uvicorn's too) to stderr in `fmt`, at `level` and above.

    `access_log`: True/False turns uvicorn's per-request lines on/off; None keeps what the
    server configured (`uvicorn vllm_chill:app --no-access-log` stays off).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else "WARNING")
    access = logging.getLogger("uvicorn.access")
    access_on = (access.propagate or bool(access.handlers)) if access_log is None else access_log
    for name in _UVICORN:
        logger = logging.getLogger(name)
        logger.handlers = []  # uvicorn's own formatters would print a second, different line
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    if not access_on:
        access.propagate = False
