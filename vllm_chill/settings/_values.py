"""Parsers for setting values, and how a value is written back in help texts.

Each parser takes the text of a flag or an environment variable and raises
`argparse.ArgumentTypeError` with a message that never repeats a secret; the caller names the
flag (and the variable) in front of it.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from urllib.parse import urlsplit

import pytimeparse2

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}


class SettingsError(ValueError):
    """A bad command line, environment variable or setting. `str()` is the one-line message;
    `prog` is the command it belongs to (for the CLI's `prog: error: message` line, exit 2)."""

    def __init__(self, message: str, *, prog: str = "vllm-chill serve") -> None:
        super().__init__(one_line(message))
        self.prog = prog


def one_line(message: str) -> str:
    """Collapse a message (a YAML error spans lines) so that it stays one log/terminal line."""
    return " ".join(message.split())


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `30s`, `5m`, `1h30m` or plain seconds; never negative."""
    value = pytimeparse2.parse(text.strip()) if text.strip() else None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (use e.g. 250ms, 30s, 5m, 1h30m or seconds)"
        )
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    return float(value)


def positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be greater than 0")
    return value


def parse_size(text: str) -> int:
    """Bytes from `1048576`, `64MiB`, `500KB`, `1G` (K/M/G are binary, KB/MB/GB decimal)."""
    match = _SIZE.match(text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 1048576, 64MiB, 1GB)")
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: must be 1-65535")
    return value


def listen_port(text: str) -> int:
    if text.strip() == "0":
        return 0  # any free port; uvicorn logs the one it got
    return port(text)


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < minimum:
        least = "at least 1" if minimum == 1 else f"{minimum} or more"
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {least}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def gpu_share(text: str) -> float:
    """A share of one GPU's memory, 0 or more and under 1 (`0.02`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid share {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"invalid share {text!r}: must be 0 or more, under 1")
    return value


def sleep_level(text: str) -> int:
    if text.strip() not in ("1", "2"):
        raise argparse.ArgumentTypeError(f"invalid sleep level {text!r} (1 or 2)")
    return int(text)


def gpu_list(text: str) -> tuple[str, ...]:
    """`0,1,2,3` → ("0", "1", "2", "3"); `none` (or empty) → () for no GPU accounting."""
    if text.strip().lower() in ("", "none"):
        return ()
    gpus = tuple(part.strip() for part in text.split(","))
    if any(not gpu or any(c.isspace() for c in gpu) for gpu in gpus):
        raise argparse.ArgumentTypeError(f"invalid GPU list {text!r} (use e.g. 0,1,2,3)")
    if len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"invalid GPU list {text!r}: a GPU is listed twice")
    return gpus


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be 0 or more")
    return value


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(choices)})"
            )
        return value

    return parse


def text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value.strip()


def secret(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")  # and never echo the value
    return value.strip()


def url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"invalid URL {value!r} (use http://host:port)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid URL {value!r}: bad port") from None
    return value.strip().rstrip("/")


def boolean(value: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"invalid boolean {value!r} (use 1/true/yes/on or 0/false/no/off)"
    )


def format_duration(seconds: float) -> str:
    """`300.0` → `5m`, `0.5` → `500ms`: how a duration default reads in `--help`."""
    if seconds == 0:
        return "0"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def format_size(size: int) -> str:
    """`67108864` → `64MiB`."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
