"""`FileRegistry`: VLLMModel manifests in YAML files and directories, reloaded when they change.

Operators edit these files while the proxy serves traffic, so a mistake must never take models
away: a file that stops parsing keeps the models it last defined, a configured path that
disappears (an unmounted volume, a ConfigMap mid-update) keeps its models too, and only a file
deleted from a watched directory removes its models. Problems are logged once per distinct
problem, not on every reload.

Start-up is the opposite: the operator is looking, so any invalid file, missing path or
duplicated served name fails fast with every problem in one `ModelValidationError` (the CLI
turns it into exit status 2). `read_models` does the same check synchronously, for the CLI's
validation before serving.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import anyio
import yaml
from anyio.abc import TaskStatus

try:  # ships with uvicorn[standard], a core dependency; without it, files are read once.
    import watchfiles

    HAVE_WATCHFILES = True
except ImportError:  # pragma: no cover - only in a broken install
    HAVE_WATCHFILES = False

from vllm_chill._model import KIND, ModelValidationError, VLLMModel
from vllm_chill.observability._logs import get_logger
from vllm_chill.registries._base import IndexedRegistry, index_models

logger = get_logger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml")
# Retry delays when the watcher itself fails (a watched directory vanished, inotify limits).
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
# watchfiles groups the events of one save (write + rename + chmod) into a single reload.
_DEBOUNCE_MS = 1_600
_STEP_MS = 50
# How often the watcher thread wakes without events; each wake re-checks that every watched
# directory still exists (inotify goes silent, and never recovers, when one is deleted).
_WAKE_MS = 5_000
_DUPLICATES = "<servedModelName>"


@dataclass(frozen=True)
class _FileResult:
    path: str
    models: tuple[VLLMModel, ...]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class _Scan:
    files: tuple[_FileResult, ...]
    #: Configured paths that do not exist (or are neither a file nor a directory).
    missing: Mapping[str, str]


def _normalize(path: str | os.PathLike[str]) -> str:
    # abspath, not realpath: a ConfigMap volume's `x.yaml -> ..data/x.yaml` must keep its name.
    return os.path.abspath(os.fspath(path))


def _manifest_files(directory: str) -> list[str]:
    """Non-recursive and sorted; dotfiles are editor swap/lock files or ConfigMap internals."""
    with os.scandir(directory) as entries:
        return sorted(
            entry.path
            for entry in entries
            if entry.name.endswith(MANIFEST_SUFFIXES)
            and not entry.name.startswith(".")
            and entry.is_file()  # follows symlinks, as ConfigMap volumes need
        )


def _models_in(
    documents: Iterable[Any], where: str, models: list[VLLMModel], problems: list[str]
) -> None:
    """Collect every document's models and problems, so one error names all of them."""
    for index, doc in enumerate(documents):
        here = f"{where}[{index}]"
        if doc is None:
            continue
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            _models_in(doc.get("items") or [], f"{here}.items", models, problems)
            continue
        if isinstance(doc, Mapping) and doc.get("kind") not in (None, KIND):
            continue  # other kinds may share a file with the models (a Deployment, ...)
        try:
            models.append(VLLMModel.from_manifest(doc, source=here))
        except ModelValidationError as exc:
            problems.extend(f"{here}: {problem}" for problem in exc.problems)


def _read_file(path: str, namespace: str | None) -> _FileResult:
    try:
        with open(path, encoding="utf-8") as stream:
            documents = list(yaml.safe_load_all(stream))
    except (OSError, UnicodeDecodeError) as exc:
        return _FileResult(path, (), (f"cannot read: {exc}",))
    except yaml.YAMLError as exc:
        return _FileResult(path, (), (f"not valid YAML: {exc}",))
    models: list[VLLMModel] = []
    problems: list[str] = []
    _models_in(documents, "document", models, problems)
    problems.extend(problem for _, problem in _duplicates({path: models}))
    if namespace is not None:
        models = [m if m.namespace else replace(m, namespace=namespace) for m in models]
    return _FileResult(path, tuple(models), tuple(problems))


def _scan(roots: Sequence[str], namespace: str | None) -> _Scan:
    """Read every configured path (blocking; runs in a worker thread once started)."""
    files: dict[str, _FileResult] = {}
    missing: dict[str, str] = {}
    for root in roots:
        if os.path.isdir(root):
            try:
                paths = _manifest_files(root)
            except OSError as exc:
                missing[root] = f"cannot list directory: {exc}"
                continue
        elif os.path.isfile(root):
            paths = [root]
        elif os.path.exists(root):
            missing[root] = "not a file or a directory"
            continue
        else:
            missing[root] = "no such file or directory"
            continue
        for path in paths:
            if path not in files:
                files[path] = _read_file(path, namespace)
    return _Scan(tuple(files.values()), missing)


def _duplicates(by_file: Mapping[str, Iterable[VLLMModel]]) -> list[tuple[set[str], str]]:
    """Two different models under one served name, with the files that define them.

    Identical repeats are harmless (the same manifest applied twice), as in `index_models`.
    """
    seen: dict[str, tuple[str, VLLMModel]] = {}
    found: list[tuple[set[str], str]] = []
    for path, models in by_file.items():
        for model in models:
            first_path, first = seen.setdefault(model.served_model_name, (path, model))
            if first != model:
                where = {first_path, path}
                found.append(
                    (
                        where,
                        f"servedModelName {model.served_model_name!r} is defined twice "
                        f"({first.name!r} and {model.name!r}, in {' and '.join(sorted(where))})",
                    )
                )
    return found


def _raise_if_invalid(scan: _Scan) -> dict[str, tuple[VLLMModel, ...]]:
    """Start-up rule: any problem anywhere fails, naming every file and every problem."""
    bad: dict[str, list[str]] = {root: [problem] for root, problem in scan.missing.items()}
    for result in scan.files:
        if result.problems:
            bad.setdefault(result.path, []).extend(result.problems)
    by_file = {result.path: result.models for result in scan.files}
    if not bad:
        duplicates = _duplicates(by_file)
        if not duplicates:
            return by_file
        files = sorted(set().union(*(where for where, _ in duplicates)))
        raise ModelValidationError(", ".join(files), [problem for _, problem in duplicates])
    if len(bad) == 1:
        [(source, problems)] = bad.items()
        raise ModelValidationError(source, problems)
    problems = [f"{path}: {problem}" for path, items in bad.items() for problem in items]
    raise ModelValidationError(", ".join(bad), problems)


def read_models(
    paths: Sequence[str | os.PathLike[str]], *, namespace: str | None = None
) -> list[VLLMModel]:
    """Load every manifest once, synchronously, or raise one error naming every problem.

    For the CLI's check before serving; the registry applies the same rules at `start()`.
    """
    roots = [_normalize(p) for p in paths]
    by_file = _raise_if_invalid(_scan(roots, namespace))
    return list(index_models(m for models in by_file.values() for m in models).values())


class FileRegistry(IndexedRegistry):
    """Models from YAML files and directories, reloaded when the files change.

    Lookups never touch the disk. `start()` and `stop()` must run in the same task (as ASGI
    lifespan does), because the registry owns the task group of its watcher; `async with`
    does both.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike[str]], *, namespace: str | None = None
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]  # a lone path is a common slip; a str is a Sequence of letters
        if not paths:
            raise ValueError("FileRegistry needs at least one file or directory")
        self._roots = tuple(dict.fromkeys(_normalize(p) for p in paths))
        self._namespace = namespace
        self._by_file: dict[str, tuple[VLLMModel, ...]] = {}
        super().__init__()
        self._reported: dict[str, tuple[str, ...]] = {}
        self._in_session = False
        # Created by start(): anyio primitives belong to the running event loop.
        self._stop: anyio.Event
        self._reload_lock: anyio.Lock
        self._ready = False
        # What the watcher's filter lets through: the names the scan may read, and the watched
        # directories themselves (a directory's deletion is reported as an event on it).
        self._file_roots: frozenset[str] = frozenset()
        self._dir_roots: frozenset[str] = frozenset()
        # The directories the OS watches now; an event on one of them itself (deleted, moved)
        # means its watch is dead even if a new directory of the same name appears at once.
        self._watching: frozenset[str] = frozenset()
        self._rewatch = False

    # -- ModelRegistry -------------------------------------------------------------------

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Reads every manifest (an invalid one fails here, before anything serves) and
        watches for changes until the session ends."""
        if self._in_session:
            raise RuntimeError("FileRegistry already has a session open")
        scan = await anyio.to_thread.run_sync(_scan, self._roots, self._namespace)
        self._by_file = _raise_if_invalid(scan)
        # Every root exists now; a root that is not a file is watched as a directory for good.
        self._file_roots = frozenset(r.path for r in scan.files if r.path in self._roots)
        self._dir_roots = frozenset(self._roots) - self._file_roots
        self._index = _index(self._by_file)
        self._stop = anyio.Event()
        self._reload_lock = anyio.Lock()
        self._in_session = True
        try:
            async with anyio.create_task_group() as task_group:
                if not HAVE_WATCHFILES:
                    logger.warning("watchfiles is not installed: model files are not reloaded")
                else:
                    await task_group.start(self._watch)
                self._ready = True
                logger.info(
                    "loaded %d model(s) from %s: %s",
                    len(self._index),
                    ", ".join(self._roots),
                    ", ".join(self._index) or "none",
                )
                try:
                    yield
                finally:
                    self._ready = False
                    self._stop.set()  # first: lets the watcher thread return
                    task_group.cancel_scope.cancel()
        finally:
            self._ready = False
            self._in_session = False

    def ready(self) -> bool:
        return self._ready

    # -- watching ------------------------------------------------------------------------

    def _watch_dirs(self) -> tuple[str, ...]:
        """The directories to watch that exist now (a file's changes arrive on its parent)."""
        wanted = dict.fromkeys(
            r if r in self._dir_roots else os.path.dirname(r) for r in self._roots
        )
        return tuple(d for d in wanted if os.path.isdir(d))

    def _relevant(self, _change: object, path: str) -> bool:
        if path in self._watching:
            self._rewatch = True
            return True
        name = os.path.basename(path)
        if name.startswith(".."):  # a ConfigMap volume swaps its `..data` symlink
            return True
        if path in self._file_roots:
            return True
        return (
            os.path.dirname(path) in self._dir_roots
            and name.endswith(MANIFEST_SUFFIXES)
            and not name.startswith(".")
        )

    async def _watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff = _BACKOFF_MIN_S
        started = False
        async with anyio.create_task_group() as task_group:
            while not self._stop.is_set():
                try:
                    dirs = await anyio.to_thread.run_sync(self._watch_dirs)
                    if not dirs:
                        raise FileNotFoundError("none of the watched directories exists")
                    watcher = watchfiles.awatch(
                        *dirs,
                        watch_filter=self._relevant,
                        stop_event=self._stop,
                        recursive=False,
                        debounce=_DEBOUNCE_MS,
                        step=_STEP_MS,
                        rust_timeout=_WAKE_MS,
                        yield_on_timeout=True,
                    )
                    self._watching, self._rewatch = frozenset(dirs), False
                    # No await from here to the generator's first step, which sets up the OS
                    # watches and only then suspends. So `start()` resumes, and the reload
                    # scheduled here runs, once changes are being recorded: whatever was
                    # written before is read by that reload, whatever comes after is an event.
                    # (Should a custom task factory run the reload eagerly, the first yield,
                    # at the latest after _WAKE_MS, reloads again.)
                    if not started:
                        task_status.started()
                        started = True
                    task_group.start_soon(self._reload)
                    reconciled = False
                    async with aclosing(watcher):
                        async for changes in watcher:
                            moved = self._rewatch or dirs != await anyio.to_thread.run_sync(
                                self._watch_dirs
                            )
                            if changes or moved or not reconciled:
                                await self._reload()
                                reconciled = True
                            backoff = _BACKOFF_MIN_S
                            if moved:
                                break  # a directory vanished, moved or came back: watch anew
                except Exception as exc:  # the watcher must outlive any failure, and retry
                    if not started:
                        task_status.started()
                        started = True
                    logger.warning("watching %s failed (%s); retrying", ", ".join(self._roots), exc)
                    with anyio.move_on_after(backoff):
                        await self._stop.wait()
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _reload(self) -> None:
        """Re-read everything; one at a time, and never raising into the watcher."""
        async with self._reload_lock:
            try:
                scan = await anyio.to_thread.run_sync(_scan, self._roots, self._namespace)
                self._apply(scan)
            except Exception:
                logger.exception("reloading %s failed", ", ".join(self._roots))

    def _apply(self, scan: _Scan) -> None:
        previous = self._by_file
        candidate: dict[str, tuple[VLLMModel, ...]] = {}
        for root, problem in scan.missing.items():
            kept = {p: m for p, m in previous.items() if p == root or os.path.dirname(p) == root}
            self._report(root, (problem,), kept_models=sum(len(m) for m in kept.values()))
            candidate.update(kept)
        for result in scan.files:
            if result.problems:
                kept_models = previous.get(result.path)
                self._report(result.path, result.problems, kept_models=len(kept_models or ()))
                if kept_models is not None:
                    candidate[result.path] = kept_models
            else:
                self._report(result.path, ())
                candidate[result.path] = result.models
        present = {result.path for result in scan.files} | set(scan.missing) | {_DUPLICATES}
        for path in set(self._reported) - present:
            del self._reported[path]  # deleted while invalid: nothing left to report
        duplicates = tuple(problem for _, problem in _duplicates(candidate))
        self._report(_DUPLICATES, duplicates, kept_models=len(self._index))
        if duplicates:
            return
        old, new = self._index, _index(candidate)
        self._by_file, self._index = candidate, new
        if list(old.values()) != list(new.values()):
            _log_changes(old, new)
            try:
                self._listeners.notify()
            except Exception:
                logger.exception("a model registry listener failed")

    def _report(self, source: str, problems: tuple[str, ...], *, kept_models: int = 0) -> None:
        """Log a source's problems once, and once more when they are fixed."""
        before = self._reported.get(source, ())
        if problems == before:
            return
        if problems:
            self._reported[source] = problems
            logger.warning(
                "%s: ignoring the change, keeping %d model(s) from before: %s",
                source,
                kept_models,
                "; ".join(problems),
            )
        else:
            del self._reported[source]
            logger.info("%s: valid again", source)


def _index(by_file: Mapping[str, Iterable[VLLMModel]]) -> dict[str, VLLMModel]:
    return index_models(m for models in by_file.values() for m in models)


def _log_changes(old: Mapping[str, VLLMModel], new: Mapping[str, VLLMModel]) -> None:
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(k for k in new.keys() & old.keys() if new[k] != old[k])
    logger.info(
        "models reloaded: added %s, changed %s, removed %s",
        added or "none",
        changed or "none",
        removed or "none",
    )
