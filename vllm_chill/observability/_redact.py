"""Which command-line flags carry secrets, and masking their values for logs and API answers."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Flags whose value is a secret (`--api-key`, `--hf-token`; not `--max-num-batched-tokens`).
SECRET_FLAG = re.compile(r"^--?(?:\w+[-_])*(?:key|token|secret|password)$", re.IGNORECASE)
MASK = "***"


def mask_secret_args(args: Iterable[str]) -> list[str]:
    """`args` with the value of every secret flag replaced by `***`, in both the
    `--flag value` and the `--flag=value` spellings."""
    out: list[str] = []
    mask_next = False
    for word in args:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        flag, eq, _ = word.partition("=")
        if SECRET_FLAG.match(flag):
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(word)
                mask_next = True
            continue
        out.append(word)
    return out
