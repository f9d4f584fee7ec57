"""The `--command` template of the local backend: words, placeholders, argv.

The template is split once, at start-up, the way a shell splits words (`shlex.split`), and is
never run through a shell. Placeholders are substituted inside each word afterwards, so a model
name with spaces or shell metacharacters (`a;b $(x)`) stays one argv element and runs nothing.
Every problem is found when the template is parsed, so a typo fails `vllm-chill serve` at once
rather than the first load.
"""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass

from vllm_chill._model import VLLMModel
from vllm_chill.settings._schema import LocalSettings

DEFAULT_COMMAND = LocalSettings.command

#: Placeholders replaced by one string (anywhere inside a word).
STRING_PLACEHOLDERS = ("port", "model", "served_model_name")
#: Placeholders replaced by several argv words; each must be a whole word of its own.
#: `{args}`: every flag the model renders for vLLM. `{extra_args}`: only the model's `extraArgs`,
#: for servers that are not vLLM (llama.cpp, SGLang) and would reject vLLM's flags.
LIST_PLACEHOLDERS = ("args", "extra_args")
PLACEHOLDERS = STRING_PLACEHOLDERS + LIST_PLACEHOLDERS

#: One piece of a word: literal text, then the placeholder that follows it (or None).
_Piece = tuple[str, str | None]


@dataclass(frozen=True)
class CommandTemplate:
    """A parsed, validated `--command`."""

    text: str
    words: tuple[tuple[_Piece, ...], ...]

    @classmethod
    def parse(cls, text: str) -> CommandTemplate:
        """Split and validate; raise `ValueError` with a one-line message on any problem."""
        try:
            raw_words = shlex.split(text)
        except ValueError as exc:  # "No closing quotation", "No escaped character"
            raise ValueError(f"invalid command template {text!r}: {exc}") from None
        if not raw_words:
            raise ValueError("invalid command template: it is empty")
        words = tuple(_parse_word(text, word) for word in raw_words)
        if _list_placeholder(words[0]) is not None:
            raise ValueError(f"invalid command template {text!r}: it must start with a program")
        return cls(text=text, words=words)

    def uses(self, placeholder: str) -> bool:
        return any(field == placeholder for word in self.words for _, field in word)

    def render(self, model: VLLMModel, port: int) -> list[str]:
        """The argv for `model` listening on `port`.

        Without `{args}` (and without `{extra_args}`) the model's vLLM flags are appended; they
        include `--model` when the template has no `{model}`, so the model is always named.
        Without `{port}`, `--port <port>` is appended."""
        values = {
            "port": str(port),
            "model": model.model_name,
            "served_model_name": model.served_model_name,
        }
        lists = {
            "args": model.vllm_args(include_model=not self.uses("model")),
            "extra_args": list(model.extra_args),
        }
        argv: list[str] = []
        for word in self.words:
            list_name = _list_placeholder(word)
            if list_name is not None:
                argv.extend(lists[list_name])
            else:
                argv.append("".join(text + (values[f] if f else "") for text, f in word))
        if not self.uses("args") and not self.uses("extra_args"):
            argv.extend(lists["args"])
        if not self.uses("port"):
            argv.extend(("--port", str(port)))
        return argv


def _parse_word(text: str, word: str) -> tuple[_Piece, ...]:
    def problem(message: str) -> ValueError:
        known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
        return ValueError(
            f"invalid command template {text!r}: {message} (placeholders: {known}; "
            "write {{ and }} for literal braces)"
        )

    try:
        parsed = list(string.Formatter().parse(word))
    except ValueError as exc:  # "Single '}' encountered in format string", ...
        raise problem(f"in {word!r}: {exc}") from None
    pieces: list[_Piece] = []
    for literal, field, spec, conversion in parsed:
        if field is None:
            pieces.append((literal, None))
            continue
        if field not in PLACEHOLDERS:
            raise problem(f"unknown placeholder {{{field}}}")
        if spec or conversion:
            raise problem(f"placeholder {{{field}}} takes no format spec or conversion")
        if field in LIST_PLACEHOLDERS and word != "{" + field + "}":
            raise problem(f"{{{field}}} must be a word of its own, not part of {word!r}")
        pieces.append((literal, field))
    return tuple(pieces)


def _list_placeholder(word: tuple[_Piece, ...]) -> str | None:
    if len(word) == 1 and word[0][0] == "" and word[0][1] in LIST_PLACEHOLDERS:
        return word[0][1]
    return None
