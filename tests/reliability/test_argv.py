"""Model names full of shell metacharacters, through the proxy, into a real child process.

The local backend runs the stand-in vLLM (`tests/local/standin_server.py`, which reports the
argv it received) and the proxy routes real requests to it. A name is data: it must reach the
child as exactly one argv element, run nothing (the canary files stay absent), and a client
cannot make the proxy start anything with a name that is not defined.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.local.local_helpers import (
    Tracker,
    is_live,
    live_group_members,
    make_model,
    standin_command,
    tracked_processes,
)
from tests.support import chat
from vllm_chill.backends.local._backend import LocalProcessBackend

from .helpers import proxy_stack

pytestmark = pytest.mark.anyio


@pytest.fixture
def canaries() -> Iterator[Path]:
    """A short directory for the files a shell would create (pytest's `tmp_path` is long, and
    a served name must stay within the proxy's 256 characters)."""
    with tempfile.TemporaryDirectory(prefix="c") as directory:
        yield Path(directory)


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    """The stand-ins the backend started (from its log); none may be left afterwards."""
    with tracked_processes() as handler:
        yield handler


def nasty_names(canaries: Path) -> tuple[str, str]:
    """(served name, model name), each trying every way a shell would run something."""
    c = canaries
    served = (
        f"m $(touch {c}/1) `touch {c}/2` ; touch {c}/3 | tee {c}/4 > {c}/5 && x || y & "
        f"'q' \"dq\" \\ * ? ~ {{a,b}} #comment\nnewline\ttab"
    )
    model_name = f"org/m$(touch {c}/6);touch {c}/7`touch {c}/8`"
    return served, model_name


async def test_metacharacters_reach_the_child_as_one_argv_element_each(
    tracker: Tracker, canaries: Path
) -> None:
    served, model_name = nasty_names(canaries)
    model = make_model(served, model_name=model_name, load_time=0.05)
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with proxy_stack(models=[model], backend=backend, max_wait=20) as stack:
        with anyio.fail_after(30):
            reply = await stack.post("/v1/chat/completions", chat(served), timeout=30)
        assert reply.status == 200, reply
        assert reply.json()["model"] == served  # the child knows itself by the exact name
        loaded = stack.proxy.switcher.loaded.get(served)
        assert loaded is not None
        async with httpx.AsyncClient(trust_env=False) as http:
            standin = (await http.get(f"{loaded.base_url}/v1/models")).json()["standin"]
    argv = standin["argv"]
    assert argv.count(served) == 1
    assert argv[argv.index("--served-model-name") + 1] == served
    assert argv.count(model_name) == 1
    assert sorted(p.name for p in canaries.iterdir()) == []  # nothing ran
    # (The tracker cannot parse a name with a newline in it: look for the child directly.)
    assert not is_live(standin["pid"]) and live_group_members(standin["pgid"]) == []


async def test_a_hostile_name_from_a_client_starts_nothing(
    tracker: Tracker, canaries: Path
) -> None:
    served, _ = nasty_names(canaries)
    backend = LocalProcessBackend(standin_command(), grace_period=1.0)
    async with proxy_stack(models=[make_model("alpha")], backend=backend, max_wait=20) as stack:
        for name in (served, f"alpha; touch {canaries}/x", "alpha\x00", "../alpha", "ALPHA"):
            reply = await stack.post("/v1/chat/completions", chat(name))
            assert reply.status == 404, reply
        assert tracker.started == []
    assert list(canaries.iterdir()) == []
