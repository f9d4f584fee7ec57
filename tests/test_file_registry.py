"""FileRegistry against a real directory: start-up validation, live reloads, and their failures.

Waits are on events (a subscriber's notification, a warning being logged), each bounded by a
timeout; nothing polls.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from vllm_chill._model import API_VERSION, KIND, ModelValidationError
from vllm_chill.registries import _files as file_registry
from vllm_chill.registries._base import ModelRegistry
from vllm_chill.registries._files import FileRegistry, read_models

# Generous: a reload normally lands ~0.1 s after the write.
TIMEOUT = 15


def manifest(name: str, *, served: str | None = None, **spec: object) -> str:
    lines = [
        f"apiVersion: {API_VERSION}",
        f"kind: {KIND}",
        "metadata:",
        f"  name: {name}",
        "spec:",
        f"  modelName: org/{name}",
        f"  servedModelName: {served or name}",
    ]
    lines += [f"  {key}: {value}" for key, value in spec.items()]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Write as editors do: a temporary file renamed over the target, so readers never see
    half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Changes:
    """Counts the registry's notifications and lets a test await the next one."""

    def __init__(self, registry: FileRegistry) -> None:
        self.count = 0
        self._event = anyio.Event()
        self.unsubscribe = registry.subscribe(self._on_change)

    def _on_change(self) -> None:
        self.count += 1
        self._event.set()

    async def next(self) -> None:
        with anyio.fail_after(TIMEOUT):
            await self._event.wait()
        self._event = anyio.Event()


class Warnings(logging.Handler):
    """Lets a test await the registry's next warning (logged from the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._event.set()

    async def next(self) -> str:
        with anyio.fail_after(TIMEOUT):
            await self._event.wait()
        self._event = anyio.Event()
        return self.messages[-1]


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    handler = Warnings()
    logger = logging.getLogger("vllm_chill.registries")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    write(directory / "alpha.yaml", manifest("alpha", maxModelLen=4096))
    return directory


@pytest.fixture
async def registry(models_dir: Path) -> AsyncIterator[FileRegistry]:
    registry = FileRegistry([models_dir], namespace="ai-apps")
    async with registry.session():
        yield registry


def served(registry: FileRegistry) -> list[str]:
    return [m.served_model_name for m in registry.models()]


@pytest.mark.anyio
async def test_loads_at_start_and_implements_the_protocol(
    models_dir: Path, registry: FileRegistry
) -> None:
    assert isinstance(registry, ModelRegistry)
    assert registry.ready()
    assert served(registry) == ["alpha"]
    alpha = registry.get("alpha")
    assert alpha is not None
    assert alpha.max_model_len == 4096
    assert alpha.namespace == "ai-apps"  # the registry's namespace fills in a missing one
    assert registry.get("nope") is None


@pytest.mark.anyio
async def test_added_changed_and_removed_files_are_seen_without_restart(
    models_dir: Path, registry: FileRegistry
) -> None:
    changes = Changes(registry)

    write(models_dir / "beta.yml", manifest("beta"))
    await changes.next()
    assert served(registry) == ["alpha", "beta"]

    write(models_dir / "alpha.yaml", manifest("alpha", maxModelLen=8192, dtype="half"))
    await changes.next()
    alpha = registry.get("alpha")
    assert alpha is not None
    assert (alpha.max_model_len, alpha.dtype) == (8192, "half")

    (models_dir / "beta.yml").unlink()
    await changes.next()
    assert served(registry) == ["alpha"]
    assert registry.get("beta") is None

    changes.unsubscribe()
    write(models_dir / "gamma.yaml", manifest("gamma"))
    await Changes(registry).next()
    assert served(registry) == ["alpha", "gamma"]
    assert changes.count == 3  # not called once unsubscribed


@pytest.mark.anyio
async def test_a_broken_file_keeps_its_last_good_models_and_logs_why(
    models_dir: Path, registry: FileRegistry, warnings: Warnings
) -> None:
    changes = Changes(registry)
    write(models_dir / "alpha.yaml", manifest("alpha", maxModelLen=100, dtype="fp8"))
    message = await warnings.next()
    assert str(models_dir / "alpha.yaml") in message
    assert "spec.maxModelLen: must be >= 512" in message
    assert "spec.dtype:" in message
    alpha = registry.get("alpha")
    assert alpha is not None
    assert alpha.max_model_len == 4096  # the last good spec, still served

    # Other files keep reloading meanwhile, and the broken one is not reported again.
    write(models_dir / "beta.yaml", manifest("beta"))
    await changes.next()
    assert served(registry) == ["alpha", "beta"]
    assert len(warnings.messages) == 1

    # Not YAML at all, then fixed.
    write(models_dir / "alpha.yaml", "spec: [unclosed\n")
    assert "not valid YAML" in await warnings.next()
    write(models_dir / "alpha.yaml", manifest("alpha", maxModelLen=2048))
    await changes.next()
    alpha = registry.get("alpha")
    assert alpha is not None
    assert alpha.max_model_len == 2048
    assert registry.ready()


@pytest.mark.anyio
async def test_a_new_invalid_file_adds_nothing(
    models_dir: Path, registry: FileRegistry, warnings: Warnings
) -> None:
    write(models_dir / "bad.yaml", manifest("bad", tensorParallelSize=0))
    message = await warnings.next()
    assert "bad.yaml" in message
    assert "spec.tensorParallelSize" in message
    assert served(registry) == ["alpha"]


@pytest.mark.anyio
async def test_a_duplicated_served_name_keeps_the_previous_models(
    models_dir: Path, registry: FileRegistry, warnings: Warnings
) -> None:
    changes = Changes(registry)
    write(models_dir / "other.yaml", manifest("other", served="alpha", dtype="half"))
    message = await warnings.next()
    assert "'alpha' is defined twice" in message
    assert "alpha.yaml" in message
    assert "other.yaml" in message
    alpha = registry.get("alpha")
    assert alpha is not None
    assert (alpha.name, alpha.dtype) == ("alpha", None)  # its own (unset), not the half

    (models_dir / "other.yaml").unlink()
    write(models_dir / "beta.yaml", manifest("beta"))
    await changes.next()
    assert served(registry) == ["alpha", "beta"]


@pytest.mark.anyio
async def test_rewriting_a_file_with_the_same_models_does_not_notify(
    models_dir: Path, registry: FileRegistry
) -> None:
    changes = Changes(registry)
    # The same model (the fixture's), written differently (a comment, another key order): no
    # change for subscribers, so nothing that runs it is restarted.
    text = "# reformatted\n" + manifest("alpha", maxModelLen=4096).replace(
        "  modelName: org/alpha\n  servedModelName: alpha\n",
        "  servedModelName: alpha\n  modelName: 'org/alpha'\n",
    )
    assert text != (models_dir / "alpha.yaml").read_text()
    write(models_dir / "alpha.yaml", text)
    # A real change afterwards proves the rewrite above was processed first, without a signal.
    write(models_dir / "beta.yaml", manifest("beta"))
    await changes.next()
    assert served(registry) == ["alpha", "beta"]
    assert changes.count == 1


@pytest.mark.anyio
async def test_a_single_file_path_is_watched(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    write(path, manifest("alpha") + "---\n" + manifest("beta"))
    (tmp_path / "ignored.yaml").write_text(manifest("ignored"))  # a sibling, not configured
    registry = FileRegistry([path])
    async with registry.session():
        assert served(registry) == ["alpha", "beta"]
        changes = Changes(registry)
        write(path, manifest("alpha"))
        await changes.next()
        assert served(registry) == ["alpha"]


@pytest.mark.anyio
async def test_configmap_volume_updates_are_seen(tmp_path: Path) -> None:
    """Kubernetes updates a mounted ConfigMap by swapping a `..data` symlink atomically."""
    volume = tmp_path / "volume"
    (volume / "..v1").mkdir(parents=True)
    (volume / "..v1" / "models.yaml").write_text(manifest("alpha"))
    (volume / "..data").symlink_to("..v1")
    (volume / "models.yaml").symlink_to("..data/models.yaml")
    registry = FileRegistry([volume])
    async with registry.session():
        assert served(registry) == ["alpha"]
        changes = Changes(registry)
        (volume / "..v2").mkdir()
        (volume / "..v2" / "models.yaml").write_text(manifest("beta"))
        (volume / "..data_tmp").symlink_to("..v2")
        (volume / "..data_tmp").replace(volume / "..data")
        await changes.next()
        assert served(registry) == ["beta"]


@pytest.mark.anyio
async def test_a_vanished_directory_keeps_its_models_and_is_watched_again(
    tmp_path: Path, warnings: Warnings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_registry, "_WAKE_MS", 200)  # how soon it re-checks directories
    directory = tmp_path / "models"
    directory.mkdir()
    write(directory / "alpha.yaml", manifest("alpha"))
    registry = FileRegistry([directory])
    async with registry.session():
        directory.rename(tmp_path / "elsewhere")  # an unmounted volume, a botched deploy
        with anyio.fail_after(TIMEOUT):
            while True:  # retries of the watcher may log warnings too
                message = await warnings.next()
                if str(directory) in message and "no such file or directory" in message:
                    break
        assert served(registry) == ["alpha"]  # still served from memory
        changes = Changes(registry)
        directory.mkdir()
        write(directory / "beta.yaml", manifest("beta"))
        await changes.next()
        assert served(registry) == ["beta"]


@pytest.mark.anyio
async def test_a_directory_swapped_for_a_new_one_is_followed(
    tmp_path: Path, models_dir: Path
) -> None:
    """Deploy scripts replace a whole directory at once; the old one's watch is then dead."""
    staged = tmp_path / "models.new"
    staged.mkdir()
    write(staged / "beta.yaml", manifest("beta"))
    registry = FileRegistry([models_dir])
    async with registry.session():
        changes = Changes(registry)
        # A first change through the watcher: past here, only events trigger reloads.
        write(models_dir / "first.yaml", manifest("first"))
        await changes.next()
        models_dir.rename(tmp_path / "models.old")
        staged.rename(models_dir)
        await changes.next()
        assert served(registry) == ["beta"]
        write(models_dir / "gamma.yaml", manifest("gamma"))  # the new directory is watched
        await changes.next()
        assert served(registry) == ["beta", "gamma"]


@pytest.mark.anyio
async def test_leaving_the_session_ends_the_watcher_promptly_and_leaves_no_task(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watcher thread would wake by itself only after a minute: leaving must not wait for it.
    monkeypatch.setattr(file_registry, "_WAKE_MS", 60_000)
    before = asyncio.all_tasks()
    registry = FileRegistry([models_dir])
    assert not registry.ready()
    async with registry.session():
        assert registry.ready()
        await anyio.wait_all_tasks_blocked()  # the watcher waits in its thread for events
        assert asyncio.all_tasks() - before
        started = anyio.current_time()
    assert anyio.current_time() - started < 20
    assert asyncio.all_tasks() == before
    assert not registry.ready()
    # A new session, still reading the files.
    async with registry.session():
        assert served(registry) == ["alpha"]
    assert asyncio.all_tasks() == before


@pytest.mark.anyio
async def test_invalid_file_at_start_fails_naming_file_and_every_problem(
    models_dir: Path,
) -> None:
    before = asyncio.all_tasks()
    write(models_dir / "bad.yaml", manifest("bad", maxModelLen=1, dtype="fp8", color="red"))
    registry = FileRegistry([models_dir])
    with pytest.raises(ModelValidationError) as caught:
        async with registry.session():
            pass
    assert caught.value.source == str(models_dir / "bad.yaml")
    assert caught.value.problems == [
        "document[0]: spec.maxModelLen: must be >= 512",
        "document[0]: spec.dtype: must be one of 'auto', 'half', 'float16', 'bfloat16', "
        "'float', 'float32'",
        "document[0]: spec.color: unknown field",
    ]
    assert not registry.ready()
    assert asyncio.all_tasks() == before


@pytest.mark.anyio
async def test_missing_path_at_start_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelValidationError) as caught:
        async with FileRegistry([tmp_path / "nope"]).session():
            pass
    assert caught.value.source == str(tmp_path / "nope")
    assert caught.value.problems == ["no such file or directory"]


def test_read_models_names_every_invalid_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", manifest("a", maxNumSeqs=0))
    write(tmp_path / "b.yaml", manifest("b") + "---\n" + manifest("b2", cpuOffloadGB=-1))
    write(tmp_path / "c.yaml", manifest("c"))
    with pytest.raises(ModelValidationError) as caught:
        read_models([tmp_path])
    message = str(caught.value)
    assert f"{tmp_path / 'a.yaml'}: document[0]: spec.maxNumSeqs: must be >= 1" in message
    assert f"{tmp_path / 'b.yaml'}: document[1]: spec.cpuOffloadGB: must be >= 0" in message
    assert "c.yaml" not in message


def test_read_models_rejects_a_served_name_defined_in_two_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", manifest("a", served="same"))
    write(tmp_path / "b.yaml", manifest("b", served="same"))
    with pytest.raises(ModelValidationError) as caught:
        read_models([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert "'same' is defined twice" in str(caught.value)
    assert caught.value.source == f"{tmp_path / 'a.yaml'}, {tmp_path / 'b.yaml'}"


def test_read_models_reads_files_and_directories_in_order(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    write(directory / "b.yaml", manifest("b"))
    write(directory / "a.yml", manifest("a"))
    (directory / "notes.txt").write_text("not a manifest")
    (directory / ".a.yaml.swp").write_bytes(b"\x00\xff")
    (directory / "sub").mkdir()
    write(directory / "sub" / "deep.yaml", manifest("deep"))  # not recursive
    write(tmp_path / "c.yaml", manifest("c"))
    models = read_models([directory, str(tmp_path / "c.yaml")], namespace="ns")
    assert [m.name for m in models] == ["a", "b", "c"]
    assert {m.namespace for m in models} == {"ns"}


def test_read_models_of_the_shipped_examples() -> None:
    examples = Path(__file__).resolve().parents[1] / "manifests" / "examples"
    names = {m.served_model_name for m in read_models([examples])}
    assert {"qwen3-coder-30b-fp8", "deepseek-r1-fp8", "llama-3.1-8b-instruct"} <= names


def test_constructor_needs_a_path() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FileRegistry([])
    # A lone path is taken as one path, not as a sequence of one-letter paths.
    assert FileRegistry(os.curdir).ready() is False
