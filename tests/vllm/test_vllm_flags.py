"""Our rendering of a `VLLMModel` against vLLM's own parser and pre-start checks.

Every example manifest, and every value of every field the CRD allows (each enum value, each
boolean true/false/unset, numbers at their bounds), is rendered the way the local backend runs
it (`vllm serve {model} {args} ...`) and handed to `tests/vllm/vllm_side.py`, which runs in
vLLM's venv: vLLM's `serve` parser, `validate_parsed_serve_args`, the parser registries, and
(with the tiny local model in place of the Hugging Face name) `create_engine_config`. All the
cases go to one vLLM process (~10 s), so this module is cheap next to the serving tests.

What is checked for each case:
- vLLM accepts it (or `VLLMModel` rejects the spec itself, for combinations vLLM refuses);
- vLLM understood what the field says: a set value arrives as that value, and an unset field
  arrives as vLLM's own default (so "unset" never overrides vLLM).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.vllm.vllm_helpers import REPO, Tier, vllm_side
from vllm_chill._model import ModelValidationError, VLLMModel, load_manifests
from vllm_chill.backends.local._command import DEFAULT_COMMAND, CommandTemplate

pytestmark = pytest.mark.vllm

EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
CRD = REPO / "manifests" / "crds" / "vllmmodel.yaml"
#: Stands in for the Hugging Face names, for vLLM's checks that read the model's config.
TINY = "tiny-llama"
PROBE = "/models/probe"  # for parse-only cases: never read
#: Fields that name things rather than set vLLM behaviour (not varied).
IDENTITY = {"modelName", "servedModelName", "extraArgs"}
UNSET = "<unset>"
#: Fields whose values vLLM's engine checks cannot judge on this machine with the tiny model:
#: they are checked by vLLM's parser, validation and registries only.
NO_ENGINE_CHECK = {
    # create_engine_config builds the reasoning parser from the model's tokenizer, which must
    # hold that model family's think tokens; the tiny model's tokenizer has none.
    "reasoningParser": "needs the think tokens of the model family's tokenizer",
    "enableSleepMode": "vLLM's CPU platform has no sleep mode",
}


def _crd_fields() -> dict[str, dict[str, Any]]:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    properties: dict[str, dict[str, Any]] = schema["properties"]["spec"]["properties"]
    return properties


def _values(schema: dict[str, Any]) -> list[tuple[Any, bool]]:
    """Every value worth trying for one field, each with whether vLLM's engine checks apply:
    each enum value, both booleans, the bounds (and, without a maximum, a large value, for
    the parser only: the engine would rightly refuse 1M tokens of context on a tiny model)."""
    if "enum" in schema:
        return [(v, True) for v in schema["enum"]]
    kind = schema.get("type")
    if kind == "boolean":
        return [(True, True), (False, True)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        if "maximum" in schema:
            return [(low, True), (int(schema["maximum"]), True)]
        return [(low, True), (max(low, 1) * 2048, False)]
    if kind == "number":
        bottom, top = float(schema.get("minimum", 0)), float(schema.get("maximum", 1))
        return [(bottom, True), (top, True), (round((bottom + top) / 2, 2), True)]
    return []


def _flag_names(key: str) -> set[str]:
    """vLLM's flag for a camelCase field: maxModelLen -> max-model-len (cpuOffloadGB too)."""
    words, current = [], ""
    for char in key:
        if char.isupper() and current and not current[-1].isupper():
            words.append(current)
            current = char
        else:
            current += char
    words.append(current)
    return {"-".join(w.lower() for w in words)}


def _dest(key: str) -> str:
    (name,) = _flag_names(key)
    return name.replace("-", "_")


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict[str, Any]
    key: str | None = None  # the field this case is about
    value: Any = UNSET
    engine: bool = True
    form: str = "local"  # "local": `vllm serve {model} {args}`; "flag": `vllm serve --model`


def _spec(tier_model: str, **fields: Any) -> dict[str, Any]:
    return {"modelName": tier_model, "servedModelName": "probe", **fields}


def _field_cases() -> list[Case]:
    cases: list[Case] = [Case("baseline", _spec(TINY))]
    for key, schema in _crd_fields().items():
        if key in IDENTITY:
            continue
        cases.append(Case(f"{key}=unset", _spec(TINY), key, UNSET))
        for value, engine in _values(schema):
            text = "''" if value == "" else str(value).lower() if isinstance(value, bool) else value
            spec = _spec(TINY, **{key: value})
            judged = engine and key not in NO_ENGINE_CHECK
            cases.append(Case(f"{key}={text}", spec, key, value, engine=judged))
            if key == "toolCallParser" and value:
                # vLLM checks the parser's name only with auto tool choice on.
                spec = _spec(TINY, toolCallParser=value, enableAutoToolChoice=True)
                cases.append(Case(f"{key}={value}+auto", spec, key, value))
    return cases


def _example_cases() -> list[Case]:
    cases = []
    for path in EXAMPLES:
        for model in load_manifests(path.read_text(), source=str(path)):
            spec = dict(model.spec)
            # As written (the Hugging Face name: parse and validation only)...
            cases.append(Case(f"{path.name}", spec, engine=False))
            cases.append(Case(f"{path.name}[--model]", spec, engine=False, form="flag"))
            # ...and with the tiny model in its place, for the engine's checks too.
            engine = {k: v for k, v in spec.items() if k not in NO_ENGINE_CHECK}
            cases.append(Case(f"{path.name}[engine]", {**engine, "modelName": TINY}))
    return cases


def _collect(make: Any) -> list[Case]:
    """Collecting must not fail the default run (which deselects this tier): a broken CRD or
    example becomes one failing case instead of a collection error."""
    try:
        cases: list[Case] = make()
    except Exception as exc:
        return [Case(f"cannot build the cases: {type(exc).__name__}: {exc}", {})]
    return cases


FIELD_CASES = _collect(_field_cases)
EXAMPLE_CASES = _collect(_example_cases)
#: Specs vLLM refuses to start with, which `VLLMModel` (and the CRD) may reject instead.
VLLM_REFUSES = {"enableAutoToolChoice=true"}


def _render(case: Case, tier: Tier) -> list[str] | str:
    """`vllm ...` argv words after `vllm`, or the problem `VLLMModel` found in the spec."""
    spec = dict(case.spec)
    if not spec:
        return case.id
    if spec["modelName"] == TINY:
        spec["modelName"] = str(tier.model(TINY))
    try:
        model = VLLMModel.from_spec(spec, source=case.id)
    except ModelValidationError as exc:
        return "; ".join(exc.problems)
    if case.form == "flag":
        return ["serve", *model.vllm_args()]
    argv: list[str] = CommandTemplate.parse(DEFAULT_COMMAND).render(model, 8000)
    assert argv[:2] == ["vllm", "serve"], argv
    return argv[1:]


@pytest.fixture(scope="module")
def verdicts(tier: Tier) -> Iterator[dict[str, Any]]:
    dests = sorted({_dest(k) for k in _crd_fields() if k not in IDENTITY} | {"model"})
    rendered: dict[str, list[str] | str] = {}
    payload = []
    for case in FIELD_CASES + EXAMPLE_CASES:
        argv = _render(case, tier)
        rendered[case.id] = argv
        if isinstance(argv, list):
            payload.append({"id": case.id, "argv": argv, "engine": case.engine, "dests": dests})
    # vLLM's own defaults: nothing but the model on the command line.
    payload.append(
        {"id": "vllm-defaults", "argv": ["serve", PROBE], "engine": False, "dests": dests}
    )
    answers = vllm_side(tier, "check", payload)
    yield {"rendered": rendered, "answers": answers}


def _verdict(verdicts: dict[str, Any], case: Case) -> tuple[list[str] | str, dict[str, Any]]:
    argv = verdicts["rendered"][case.id]
    return argv, verdicts["answers"].get(case.id, {})


@pytest.mark.parametrize("case", EXAMPLE_CASES, ids=lambda c: c.id)
def test_example_manifest_is_accepted_by_vllm(case: Case, verdicts: dict[str, Any]) -> None:
    argv, answer = _verdict(verdicts, case)
    assert isinstance(argv, list), f"VLLMModel rejects the example: {argv}"
    assert answer["ok"], f"vLLM refuses `vllm {' '.join(argv)}` at {answer['stage']}: {answer}"


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: c.id)
def test_field_value_is_accepted_and_understood_by_vllm(
    case: Case, verdicts: dict[str, Any]
) -> None:
    argv, answer = _verdict(verdicts, case)
    if isinstance(argv, str):
        assert case.id in VLLM_REFUSES, f"VLLMModel rejects a value the CRD allows: {argv}"
        return
    words = " ".join(argv)
    assert answer["ok"], f"vLLM refuses `vllm {words}` at {answer['stage']}: {answer['error']}"
    if case.key is None:
        return
    dest = _dest(case.key)
    got = answer["values"][dest]
    default = verdicts["answers"]["vllm-defaults"]["values"][dest]
    if case.value == UNSET:
        assert got == default, (
            f"{case.key} unset must leave vLLM's default ({dest}={default!r}); "
            f"`vllm {words}` gives {got!r}"
        )
    elif case.value == "":
        assert got == default or got in ("", None), f"{dest}={got!r} from `vllm {words}`"
    elif isinstance(case.value, bool):
        assert got is case.value, (
            f"{case.key}: {str(case.value).lower()} must reach vLLM as {dest}={case.value}; "
            f"`vllm {words}` gives {got!r} (vLLM's default: {default!r})"
        )
    elif isinstance(case.value, (int, float)):
        assert isinstance(got, (int, float)) and math.isclose(got, case.value), (
            f"{dest}={got!r} from `vllm {words}`"
        )
    else:
        assert isinstance(got, str) and got, f"{dest}={got!r} from `vllm {words}`"


# --- our enums against vLLM's registries ----------------------------------------------------


@pytest.fixture(scope="module")
def facts(tier: Tier) -> dict[str, Any]:
    answer: dict[str, Any] = vllm_side(tier, "facts")
    return answer


def _rendered_value(spec: dict[str, Any], flag: str) -> str | None:
    args = VLLMModel.from_spec(spec).vllm_args(include_model=False)
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize(
    ("key", "flag", "registry"),
    [
        ("toolCallParser", "--tool-call-parser", "tool_call_parsers"),
        ("reasoningParser", "--reasoning-parser", "reasoning_parsers"),
    ],
    ids=["tool-call", "reasoning"],
)
def test_parser_enums_match_vllm_s_registries(
    key: str, flag: str, registry: str, facts: dict[str, Any]
) -> None:
    """Every name we accept renders a name vLLM registers, and every name vLLM registers can
    be written (the CRD's enum and `VLLMModel` agree with each other in test_manifests)."""
    registered = set(facts[registry])
    enum = [v for v in _crd_fields()[key]["enum"] if v]
    extra = {"enableAutoToolChoice": True} if key == "toolCallParser" else {}
    rendered = {v: _rendered_value(_spec(PROBE, **{key: v}, **extra), flag) for v in enum}
    unknown = {v: r for v, r in rendered.items() if r not in registered}
    assert not unknown, f"{key} values vLLM does not register (as rendered): {unknown}"
    missing = sorted(registered - set(enum))
    assert not missing, f"{key}: vLLM {facts['vllm']} registers names we reject: {missing}"


def test_dtype_enum_is_vllm_s(facts: dict[str, Any]) -> None:
    choices = facts["options"]["dtype"]["choices"]
    assert sorted(_crd_fields()["dtype"]["enum"]) == sorted(choices)


def test_rendered_flags_exist_in_vllm(facts: dict[str, Any]) -> None:
    """Every flag a VLLMModel can render is one of `vllm serve`'s own spellings."""
    spellings = {f for option in facts["options"].values() for f in option["flags"]}
    rendered = set()
    for case in FIELD_CASES:
        if case.value == UNSET or case.id in VLLM_REFUSES:
            continue
        try:
            model = VLLMModel.from_spec({**case.spec, "modelName": PROBE})
        except ModelValidationError:
            continue
        rendered |= {w for w in model.vllm_args() if w.startswith("--")}
    assert rendered - spellings == set()
