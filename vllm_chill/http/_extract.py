"""Reading the model name out of a request body, without changing the body.

JSON bodies are parsed fully: the model key may come last, and a body that is not valid JSON
must be refused with a 400 rather than forwarded. Multipart bodies (audio uploads) are scanned
with python-multipart for the `model` field only; file parts are not kept.
"""

from __future__ import annotations

import json
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

#: Bound on a model name: longer names are refused rather than looked up or logged.
MAX_MODEL_NAME = 256


class BadRequest(Exception):
    """The body cannot be routed; `param` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.message = message
        self.param = param
        super().__init__(message)


def model_from_json(body: bytes) -> str | None:
    """The top-level `"model"` of a JSON object body; None when the object has none."""
    return model_and_stream(body)[0]


def model_and_stream(body: bytes) -> tuple[str | None, bool]:
    """The top-level `"model"` of a JSON object body (None when the object has none), and
    whether the body asks for a stream (`"stream": true`), from the one parse."""
    try:
        data: Any = json.loads(body)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = data.get("model")
    if model is None:
        return None, False
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string.", param="model")
    return _checked(model), data.get("stream") is True


def model_from_multipart(body: bytes, content_type: bytes) -> str | None:
    """The `model` form field of a multipart/form-data body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary.")
    found: list[bytes] = []
    state = {"name": b"", "field": b"", "value": b"", "is_model": False}
    header_field = bytearray()
    header_value = bytearray()
    part_data = bytearray()

    def on_part_begin() -> None:
        state["is_model"] = False
        part_data.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        if bytes(header_field).lower() == b"content-disposition":
            _, disposition = parse_options_header(bytes(header_value))
            state["is_model"] = disposition.get(b"name") == b"model"
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["is_model"]:
            if len(part_data) + end - start > MAX_MODEL_NAME * 4:
                raise BadRequest("'model' is too long.", param="model")
            part_data.extend(data[start:end])

    def on_part_end() -> None:
        if state["is_model"]:
            found.append(bytes(part_data))

    try:
        # Inside the `try`: the parser refuses some boundaries (longer than 256 bytes) as it
        # is built, and a client's bad boundary is a 400, never a 500.
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
        parser.write(body)
        parser.finalize()
    except BadRequest:
        raise
    except Exception:
        raise BadRequest("The multipart/form-data body is malformed.") from None
    if not found:
        return None
    try:
        model = found[0].decode()
    except UnicodeDecodeError:
        raise BadRequest("'model' is not valid UTF-8.", param="model") from None
    return _checked(model)


def _checked(model: str) -> str:
    if len(model) > MAX_MODEL_NAME:
        raise BadRequest(f"'model' is longer than {MAX_MODEL_NAME} characters.", param="model")
    return model
