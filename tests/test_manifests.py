"""The three places that hold VLLMModel's rules must agree (SPEC §4), and every manifest shipped
in `manifests/` and `examples/` must be valid Kubernetes (SPEC §5).

The CRD's structural schema is checked as a JSON schema the way the API server applies it:
`x-kubernetes-*` keys and `default` change nothing about validity, and fields the schema does
not list are rejected (kubectl's default strict field validation; pruned otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vllm_chill.model import (
    API_GROUP,
    API_VERSION,
    FIELDS,
    KIND,
    PLURAL,
    ModelValidationError,
    VLLMModel,
)

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "manifests" / "crds" / "vllmmodel.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
# The oldest Kubernetes minor the manifests promise to work on, and the newest known.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return crd


def crd_version(crd: Mapping[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    return dict(version)


def as_json_schema(schema: Any) -> Any:
    """The structural schema as the API server enforces it, in JSON schema terms."""
    if isinstance(schema, list):
        return [as_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: as_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


CRD = load_crd()
OPENAPI = crd_version(CRD)["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = OPENAPI["properties"]["spec"]
# OpenAPI v3.0 schema objects follow JSON schema draft 4 (e.g. 1.0 is not an integer).
VALIDATOR = jsonschema.Draft4Validator(as_json_schema(OPENAPI))


def resource(spec: Mapping[str, Any], name: str = "m") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": "ai-apps"},
        "spec": dict(spec),
    }


def schema_errors(obj: Mapping[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(obj)
    ]


# -- the CRD itself -------------------------------------------------------------------------


def test_crd_names_and_version() -> None:
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["kind"] == "CustomResourceDefinition"
    assert CRD["metadata"]["name"] == f"{PLURAL}.{API_GROUP}"
    spec = CRD["spec"]
    assert spec["group"] == API_GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == KIND
    assert spec["names"]["plural"] == PLURAL
    assert spec["names"]["singular"] == "vllmmodel"
    assert spec["names"]["shortNames"] == ["vm", "vllm"]
    version = crd_version(CRD)
    assert f"{API_GROUP}/{version['name']}" == API_VERSION
    assert version["served"] is True
    assert version["storage"] is True


def test_crd_status_subresource_and_printer_columns() -> None:
    version = crd_version(CRD)
    assert version["subresources"] == {"status": {}}
    status = OPENAPI["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Loading", "Ready", "Failed", "Unloaded"]
    assert status["message"]["type"] == "string"
    assert status["lastUpdated"] == {"type": "string", "format": "date-time"}
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ("string", ".spec.modelName"),
        "Served-Name": ("string", ".spec.servedModelName"),
        "Status": ("string", ".status.phase"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }


def test_crd_spec_fields_are_exactly_the_rules_table() -> None:
    """Types, required, enums, bounds and defaults: the CRD and FIELDS say the same thing."""
    properties = SPEC_SCHEMA["properties"]
    assert set(properties) == {rule.key for rule in FIELDS} | {"extraArgs"}
    assert set(SPEC_SCHEMA["required"]) == {rule.key for rule in FIELDS if rule.required}
    assert OPENAPI["required"] == ["spec"]
    for rule in FIELDS:
        prop = properties[rule.key]
        assert prop["type"] == JSON_TYPES[rule.kind], rule.key
        assert prop.get("enum") == (list(rule.choices) if rule.choices is not None else None)
        assert prop.get("minimum") == rule.minimum, rule.key
        assert prop.get("maximum") == rule.maximum, rule.key
        if rule.required:
            assert prop["minLength"] == 1, rule.key
        if rule.default is None:
            assert "default" not in prop, rule.key
        else:
            assert prop["default"] == rule.default, rule.key
            # 1 == 1.0 == True in Python: the types must match too.
            assert type(prop["default"]) is type(rule.default), rule.key
    assert properties["extraArgs"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": properties["extraArgs"]["description"],
    }


def test_crd_defaults_are_valid_and_give_the_python_defaults() -> None:
    minimal = {"modelName": "org/m", "servedModelName": "m"}
    defaulted = dict(minimal)
    for key, prop in SPEC_SCHEMA["properties"].items():
        if "default" in prop:
            # The API server refuses a CRD whose defaults break their own schema.
            jsonschema.Draft4Validator(as_json_schema(prop)).validate(prop["default"])
            defaulted.setdefault(key, prop["default"])
    assert VLLMModel.from_spec(defaulted) == VLLMModel.from_spec(minimal)
    assert VLLMModel.from_spec(defaulted).vllm_args() == VLLMModel.from_spec(minimal).vllm_args()


def walk(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_crd_schema_is_structural() -> None:
    """Rules the API server enforces on CRDs that kubernetes_validate cannot check."""
    for path, node in walk(OPENAPI):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if "properties" in node:
            assert "additionalProperties" not in node, path
        assert not {"$ref", "definitions", "dependencies", "id", "patternProperties"} & set(node), (
            path
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_valid_kubernetes(version: str) -> None:
    kubernetes_validate.validate(load_crd(), version, strict=True)


def test_kubernetes_validate_would_catch_a_broken_crd() -> None:
    broken = load_crd()
    broken["spec"]["versions"][0]["servd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# -- the examples -------------------------------------------------------------------------


#: The model files; 00-namespace.yaml creates ai-apps first when the folder is applied whole.
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "00-namespace.yaml")


def test_applying_the_examples_folder_creates_its_namespace_first() -> None:
    first = sorted(EXAMPLES.glob("*.yaml"))[0]
    [doc] = list(yaml.safe_load_all(first.read_text()))
    assert (doc["kind"], doc["metadata"]["name"]) == ("Namespace", "ai-apps")


def test_the_examples_are_the_documented_models() -> None:
    names = {path.stem for path in EXAMPLE_FILES}
    assert {"qwen3-coder-30b-fp8", "deepseek-r1-fp8", "llama-3.1-8b-instruct"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_valid_for_both_schema_and_python(path: Path) -> None:
    [doc] = list(yaml.safe_load_all(path.read_text()))
    assert schema_errors(doc) == []
    model = VLLMModel.from_manifest(doc, source=str(path))
    # One model per file, named after what clients call it.
    assert doc["metadata"]["name"] == model.served_model_name == path.stem
    assert doc["metadata"]["namespace"] == "ai-apps"


def test_example_settings() -> None:
    by_name = {
        m.served_model_name: m
        for path in EXAMPLE_FILES
        for m in [VLLMModel.from_manifest(yaml.safe_load(path.read_text()))]
    }
    qwen = by_name["qwen3-coder-30b-fp8"]
    assert qwen.model_name == "Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8"
    assert (qwen.tool_call_parser, qwen.enable_auto_tool_choice) == ("qwen3_coder", True)
    assert qwen.gpu_memory_utilization == 0.92
    assert by_name["deepseek-r1-fp8"].reasoning_parser == "deepseek_r1"
    llama = by_name["llama-3.1-8b-instruct"]
    assert (llama.model_name, llama.tool_call_parser) == (
        "meta-llama/Llama-3.1-8B-Instruct",
        "llama3_json",
    )


# -- agreement between the CRD schema and VLLMModel ------------------------------------------

BASE = {"modelName": "org/model", "servedModelName": "served"}
UNSET = object()

# (field, value): each breaks exactly one rule of SPEC §4. UNSET removes the field.
INVALID = [
    ("modelName", UNSET),
    ("servedModelName", UNSET),
    ("modelName", ""),
    ("servedModelName", ""),
    ("modelName", "   "),
    ("modelName", 42),
    ("servedModelName", ["a"]),
    ("toolCallParser", "hermes2"),
    ("toolCallParser", "Hermes"),
    ("toolCallParser", "llama3-json"),
    ("reasoningParser", "deepseek_r2"),
    ("reasoningParser", 1),
    ("dtype", "fp8"),
    ("dtype", "BF16"),
    ("tensorParallelSize", 0),
    ("tensorParallelSize", -1),
    ("tensorParallelSize", "2"),
    ("tensorParallelSize", 1.5),
    ("tensorParallelSize", True),
    ("maxModelLen", 511),
    ("maxModelLen", "4096"),
    ("gpuMemoryUtilization", 0.09),
    ("gpuMemoryUtilization", 0),
    ("gpuMemoryUtilization", 1.01),
    ("gpuMemoryUtilization", 2),
    ("gpuMemoryUtilization", "0.9"),
    ("gpuMemoryUtilization", False),
    ("enableChunkedPrefill", "true"),
    ("enableChunkedPrefill", 1),
    ("maxNumBatchedTokens", 0),
    ("maxNumSeqs", 0),
    ("maxNumSeqs", "many"),
    ("disableCustomAllReduce", "no"),
    ("enablePrefixCaching", "false"),
    ("enablePrefixCaching", 0),
    ("cpuOffloadGB", -1),
    ("cpuOffloadGB", 0.5),
    ("enableAutoToolChoice", "yes"),
    ("extraArgs", "--seed 0"),
    ("extraArgs", ["--seed", 0]),
    ("extraArgs", {"--seed": "0"}),
    ("maxModelLength", 4096),  # a typo is an unknown field, not a silent default
    ("model", "org/other"),
]

VALID = [
    ("gpuMemoryUtilization", 0.1),
    ("gpuMemoryUtilization", 1.0),
    ("gpuMemoryUtilization", 1),
    ("maxModelLen", 512),
    ("maxModelLen", 131072),
    ("tensorParallelSize", 1),
    ("tensorParallelSize", 8),
    ("maxNumBatchedTokens", 1),
    ("maxNumSeqs", 1),
    ("cpuOffloadGB", 0),
    ("cpuOffloadGB", 64),
    ("extraArgs", []),
    ("extraArgs", ["--chat-template", "{{ x }}; rm -rf / && echo $HOME"]),
    ("modelName", "/models/local path/with spaces"),
    *[(rule.key, value) for rule in FIELDS if rule.kind == "bool" for value in (True, False)],
    *[(rule.key, choice) for rule in FIELDS for choice in rule.choices or ()],
]


def with_value(key: str, value: object) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(BASE)
    if value is UNSET:
        spec.pop(key)
    else:
        spec[key] = value
    return spec


@pytest.mark.parametrize(("key", "value"), INVALID, ids=repr)
def test_invalid_spec_is_rejected_by_both(key: str, value: object) -> None:
    spec = with_value(key, value)
    errors = schema_errors(resource(spec))
    assert errors, f"the CRD schema accepts spec.{key}={value!r}"
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_manifest(resource(spec))
    assert any(p.startswith(f"spec.{key}:") for p in caught.value.problems), caught.value


@pytest.mark.parametrize(("key", "value"), VALID, ids=repr)
def test_valid_spec_is_accepted_by_both(key: str, value: object) -> None:
    spec = with_value(key, value)
    assert schema_errors(resource(spec)) == []
    described = VLLMModel.from_manifest(resource(spec)).describe()
    assert described.get(key, [] if key == "extraArgs" else None) == value


def test_every_rule_of_the_table_is_exercised() -> None:
    """Adding a field to FIELDS without a bad value here would leave it unchecked."""
    assert {key for key, _ in INVALID} >= {rule.key for rule in FIELDS} | {"extraArgs"}


def test_missing_spec_is_rejected_by_both() -> None:
    obj = resource(BASE)
    del obj["spec"]
    assert schema_errors(obj)
    with pytest.raises(ModelValidationError):
        VLLMModel.from_manifest(obj)


def test_one_python_error_lists_what_the_schema_finds() -> None:
    spec = {**BASE, "dtype": "fp8", "maxNumSeqs": 0, "cpuOffloadGB": -3, "colour": "blue"}
    schema_fields: set[str] = set()
    for error in VALIDATOR.iter_errors(resource(spec)):
        if error.validator == "additionalProperties":
            schema_fields |= set(error.instance) - set(error.schema["properties"])
        else:
            schema_fields.add(str(error.absolute_path[-1]))
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_manifest(resource(spec))
    python_fields = {p.split(":")[0].removeprefix("spec.") for p in caught.value.problems}
    assert python_fields == schema_fields == {"dtype", "maxNumSeqs", "cpuOffloadGB", "colour"}


def test_status_phase_is_checked_by_the_schema() -> None:
    obj = resource(BASE)
    obj["status"] = {"phase": "Ready", "message": "ok", "lastUpdated": "2025-01-01T00:00:00Z"}
    assert schema_errors(obj) == []
    obj["status"]["phase"] = "Running"
    assert schema_errors(obj)


# -- everything shipped is valid Kubernetes ------------------------------------------------


def shipped_documents() -> list[Any]:
    """Every YAML document under manifests/ and examples/, including files added later."""
    params = []
    for folder in ("manifests", "examples"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".yaml", ".yml") or not path.is_file():
                continue
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            for index, doc in enumerate(docs):
                name = f"{path.relative_to(ROOT)}[{index}]:{doc.get('kind', '?')}"
                params.append(pytest.param(path, doc, id=name))
    return params


SHIPPED = shipped_documents()


def test_shipped_manifests_are_found() -> None:
    found = {str(p.values[0].relative_to(ROOT)) for p in SHIPPED}
    assert "manifests/crds/vllmmodel.yaml" in found
    assert {f"manifests/examples/{p.name}" for p in EXAMPLE_FILES} <= found


@pytest.mark.parametrize(("path", "doc"), SHIPPED)
def test_shipped_document_is_valid_kubernetes(path: Path, doc: Any) -> None:
    assert isinstance(doc, dict), f"{path}: a document must be a mapping"
    items = (doc.get("items") or []) if doc.get("kind") == "List" else [doc]
    for item in items:
        if item.get("apiVersion") == API_VERSION and item.get("kind") == KIND:
            assert schema_errors(item) == [], path
            VLLMModel.from_manifest(item, source=str(path))
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(item, version, strict=True)
