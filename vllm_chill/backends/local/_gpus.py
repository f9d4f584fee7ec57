"""Which GPUs this machine offers the local backend, when `--gpus` does not say.

`CUDA_VISIBLE_DEVICES` first (what the operator already chose for this process), else the GPUs
`nvidia-smi -L` lists, else none: no GPU accounting, one model at a time. Blocking (it may run
`nvidia-smi`): called once, while the backend is built.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping

#: `nvidia-smi -L` prints `GPU 0: NVIDIA H200 (UUID: GPU-...)` per GPU.
_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)
NVIDIA_SMI_TIMEOUT = 10.0


def discover_gpus(environ: Mapping[str, str], *, nvidia_smi: str | None = None) -> tuple[str, ...]:
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # Set, even to nothing: that is the operator's choice ("" and "-1" hide every GPU).
        ids = tuple(part.strip() for part in visible.split(",") if part.strip())
        return () if ids in ((), ("-1",)) else ids
    command = nvidia_smi or shutil.which("nvidia-smi")
    if command is None:
        return ()
    try:
        listing = subprocess.run(
            [command, "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if listing.returncode != 0:
        return ()
    return tuple(_GPU_LINE.findall(listing.stdout))
