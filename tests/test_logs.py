"""Log lines: text and JSON, uvicorn's loggers routed through ours, secrets redacted."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from vllm_chill.observability._logs import configure_logging, get_logger

_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in _LOGGERS
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers, logger.level, logger.propagate = handlers, level, propagate


def test_text_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    logging.getLogger("vllm_chill.scheduler").info("switch phase=%s model=%s", "loading", "x")
    logging.getLogger("vllm_chill.scheduler").debug("not shown at info")
    line = capsys.readouterr().err
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO vllm_chill\.scheduler "
        r"switch phase=loading model=x\n",
        line,
    ), line


def test_json_lines_with_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "json")
    log = logging.getLogger("vllm_chill.middleware")
    log.debug("plain")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed: %d", 42)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first.keys() == {"ts", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == (
        "DEBUG",
        "vllm_chill.middleware",
        "plain",
    )
    assert second["message"] == "it failed: 42"
    assert "RuntimeError: boom" in second["exc_info"]


def test_uvicorn_loggers_go_through_ours_once(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler())  # as uvicorn's config
    logging.getLogger("uvicorn.error").propagate = False
    configure_logging("info", "json", access_log=True)
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "1.2.3.4", "GET", "/", "1.1", 200
    )
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["logger"], e["message"]) for e in lines] == [
        ("uvicorn.error", "Application startup complete."),
        ("uvicorn.access", '1.2.3.4 - "GET / HTTP/1.1" 200'),
    ]


def test_access_log_off(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text", access_log=False)
    logging.getLogger("uvicorn.access").info("GET /")
    assert capsys.readouterr().err == ""


def test_httpx_request_lines_are_quiet_unless_debugging(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    logging.getLogger("httpx").info("HTTP Request: POST http://upstream")
    assert capsys.readouterr().err == ""


def test_secrets_are_redacted_whatever_logs_them(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text", secrets=["sk-very-secret", "ab"])
    logging.getLogger("somewhere").warning("header Authorization: Bearer sk-very-secret, tab")
    err = capsys.readouterr().err
    assert "sk-very-secret" not in err
    assert err.endswith("header Authorization: Bearer ***, tab\n")  # short ones are left alone


def test_configuring_again_replaces_our_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    configure_logging("info", "json")
    logging.getLogger("x").info("once")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "once"


def test_loggers_are_named_by_public_package() -> None:
    assert (
        get_logger("vllm_chill.backends.kubernetes._watch").name == "vllm_chill.backends.kubernetes"
    )
    assert get_logger("vllm_chill.middleware").name == "vllm_chill.middleware"
