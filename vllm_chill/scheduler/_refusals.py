"""Why a request cannot be served now: one exception type per answer, each carrying its HTTP
status, error code, `Retry-After` and the details its body shows, so that the HTTP layer renders
every refusal the same way (`ModelSwitchMiddleware._refused`) without knowing the cases."""

from __future__ import annotations

from typing import Any, ClassVar


def loading_message(model: str) -> str:
    """The sentence clients of the original vllm-chill rely on: kept word for word."""
    return f"Model '{model}' is currently loading. Please wait and retry in a few moments."


class Refused(Exception):
    status: ClassVar[int] = 503
    code: ClassVar[str] = "not_ready"
    #: OpenAI's `type` when it is not the one of the status.
    error_type: ClassVar[str | None] = None

    def __init__(
        self, model: str, retry_after: int, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.retry_after = retry_after
        self.message = message
        #: Extra fields of the error object (`model`, `phase`, ...).
        self.details = details or {}


class ModelLoading(Refused):
    """The model is loading, or waits for its turn: come back after `retry_after`."""

    code = "model_switching_in_progress"
    error_type = "model_loading"

    def __init__(self, model: str, retry_after: int, *, phase: str, elapsed: float) -> None:
        super().__init__(
            model,
            retry_after,
            loading_message(model),
            {
                "model": model,
                "phase": phase,
                "elapsed_seconds": round(elapsed, 1),
                "estimated_seconds_remaining": retry_after,
            },
        )


class LoadFailed(Refused):
    """The model's last load failed; it is refused for a back-off."""

    code = "model_switch_failed"

    def __init__(self, model: str, retry_after: int, reason: str) -> None:
        super().__init__(
            model, retry_after, f"Model '{model}' failed to load: {reason}", {"model": model}
        )
        self.reason = reason


class TooManyWaiting(Refused):
    code = "too_many_waiting"

    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(
            model,
            retry_after,
            f"Too many requests are waiting for models to load; retry model '{model}' later.",
            {"model": model},
        )


class NotRunning(Refused):
    code = "not_ready"

    def __init__(self, model: str = "") -> None:
        super().__init__(model, 5, "vllm-chill is not running (was ASGI lifespan started?).")
