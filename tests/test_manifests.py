"""The three places that hold VLLMModel's rules must agree, and every manifest shipped in
`manifests/` and `examples/` must be valid Kubernetes.

The CRD's structural schema is checked as a JSON schema the way the API server applies it:
`x-kubernetes-*` keys change nothing about validity, and fields the schema does not list are
rejected (kubectl's default strict field validation; pruned otherwise). Its CEL rules
(`x-kubernetes-validations`) are checked through their Python equivalents in `CEL_RULES`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import vllm_chill
from vllm_chill._model import (
    API_GROUP,
    API_VERSION,
    FIELDS,
    KIND,
    PLURAL,
    REASONING_PARSERS,
    TOOL_CALL_PARSER_RENAMES,
    TOOL_CALL_PARSERS,
    ModelValidationError,
    VLLMModel,
)

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "manifests" / "crds" / "vllmmodel.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
CLUSTER_EXAMPLE = ROOT / "examples" / "kubernetes-with-model-switching.yaml"
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
FIELDS_SCHEMA = OPENAPI["properties"]["spec"]
# OpenAPI v3.0 schema objects follow JSON schema draft 4 (e.g. 1.0 is not an integer).
VALIDATOR = jsonschema.Draft4Validator(as_json_schema(OPENAPI))

#: The spec's CEL rules, as the API server evaluates them, in Python: rule -> (spec -> ok).
CEL_RULES: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "!has(self.enableAutoToolChoice) || !self.enableAutoToolChoice || "
    "(has(self.toolCallParser) && self.toolCallParser != '')": lambda spec: (
        not spec.get("enableAutoToolChoice") or bool(spec.get("toolCallParser"))
    ),
}


def cel_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = FIELDS_SCHEMA.get("x-kubernetes-validations", [])
    return rules


def one_line(rule: str) -> str:
    return re.sub(r"\s+", " ", rule).strip()


def resource(spec: Mapping[str, Any], name: str = "m") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": "ai-apps"},
        "spec": dict(spec),
    }


def schema_errors(obj: Mapping[str, Any]) -> list[str]:
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(obj)
    ]
    spec = obj.get("spec")
    if not errors and isinstance(spec, Mapping):
        # The API server runs CEL rules only on objects that pass the structural schema.
        for rule in cel_rules():
            if not CEL_RULES[one_line(rule["rule"])](spec):
                errors.append(f"spec{rule.get('fieldPath', '')}: {rule['message']}")
    return errors


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
    assert status["deployment"]["type"] == "string"
    assert set(status["lastSwitch"]["properties"]) == {
        "from", "result", "kind", "startedAt", "finishedAt", "durationSeconds", "reason",
    }  # fmt: skip
    assert status["lastSwitch"]["properties"]["result"]["enum"] == ["success", "failure"]
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ("string", ".spec.modelName"),
        "Served-Name": ("string", ".spec.servedModelName"),
        "Status": ("string", ".status.phase"),
        "Deployment": ("string", ".status.deployment"),
        "Message": ("string", ".status.message"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }
    wide_only = {c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")}
    assert wide_only == {"Message"}


def test_crd_spec_fields_are_exactly_the_rules_table() -> None:
    """Types, required, enums, bounds and defaults: the CRD and FIELDS say the same thing."""
    properties = FIELDS_SCHEMA["properties"]
    assert set(properties) == {rule.key for rule in FIELDS} | {"extraArgs"}
    assert set(FIELDS_SCHEMA["required"]) == {rule.key for rule in FIELDS if rule.required}
    assert OPENAPI["required"] == ["spec"]
    for rule in FIELDS:
        prop = properties[rule.key]
        assert prop["type"] == JSON_TYPES[rule.kind], rule.key
        assert prop.get("enum") == (list(rule.choices) if rule.choices is not None else None)
        assert prop.get("minimum") == rule.minimum, rule.key
        assert prop.get("maximum") == rule.maximum, rule.key
        if rule.required:
            assert prop["minLength"] == 1, rule.key
    assert properties["extraArgs"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": properties["extraArgs"]["description"],
    }


def test_the_crd_sets_no_default() -> None:
    """An unset field must reach vllm-chill unset, so that it renders no flag and vLLM's own
    default applies; a CRD default would be stored in the object and rendered."""
    for path, node in walk(OPENAPI):
        assert "default" not in node, path


def test_the_parser_enums_are_the_python_lists() -> None:
    properties = FIELDS_SCHEMA["properties"]
    assert properties["toolCallParser"]["enum"] == list(TOOL_CALL_PARSERS)
    assert properties["reasoningParser"]["enum"] == list(REASONING_PARSERS)
    for name in ("", "hermes", "mistral", "llama3_json", "internlm2", "qwen3_coder", "granite"):
        assert name in properties["toolCallParser"]["enum"]
    assert {"", "deepseek_r1", "qwen3", "openai_gptoss"} <= set(
        properties["reasoningParser"]["enum"]
    )


def test_every_cel_rule_has_its_python_equivalent() -> None:
    rules = cel_rules()
    assert {one_line(r["rule"]) for r in rules} == set(CEL_RULES)
    for rule in rules:
        assert rule["message"]
        # fieldPath names a field of the spec (the API server refuses a CRD otherwise).
        assert rule["fieldPath"].removeprefix(".") in FIELDS_SCHEMA["properties"]


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


class _Unset:
    """A field left out of the manifest; its repr names it in test ids, the same in every
    process (parallel workers must collect the same ids)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()

# (field, value): each breaks exactly one rule of the table. UNSET removes the field.
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
    ("toolCallParser", "internlm3"),
    ("enableAutoToolChoice", True),  # without a toolCallParser: vLLM refuses to start
    ("enableSleepMode", "yes"),
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
    ("extraArgs", "--max-logprobs 5"),
    ("extraArgs", ["--max-logprobs", 5]),
    ("extraArgs", {"--max-logprobs": "5"}),
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
#: What a valid value of a field needs beside it.
NEEDS: dict[str, dict[str, Any]] = {"enableAutoToolChoice": {"toolCallParser": "hermes"}}


def with_value(key: str, value: object, base: Mapping[str, Any] = BASE) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(dict(base))
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
    spec = with_value(key, value, {**BASE, **NEEDS.get(key, {})})
    assert schema_errors(resource(spec)) == []
    described = VLLMModel.from_manifest(resource(spec)).describe()
    if key == "toolCallParser" and isinstance(value, str):
        value = TOOL_CALL_PARSER_RENAMES.get(value, value)
    assert described.get(key, [] if key == "extraArgs" else None) == value


def test_every_rule_of_the_table_is_exercised() -> None:
    """Adding a field to FIELDS without a bad value here would leave it unchecked."""
    assert {key for key, _ in INVALID} >= {rule.key for rule in FIELDS} | {"extraArgs"}


@pytest.mark.parametrize("parser", [UNSET, ""], ids=repr)
def test_auto_tool_choice_without_a_parser_is_rejected_by_both(parser: object) -> None:
    spec = {**BASE, "enableAutoToolChoice": True}
    if parser is not UNSET:
        spec["toolCallParser"] = parser
    assert schema_errors(resource(spec)) == [
        "spec.enableAutoToolChoice: enableAutoToolChoice requires a toolCallParser"
    ]
    with pytest.raises(ModelValidationError) as caught:
        VLLMModel.from_manifest(resource(spec))
    assert [p.split(":")[0] for p in caught.value.problems] == ["spec.enableAutoToolChoice"]


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


#: A status as the Kubernetes backend writes it after a failed switch.
WRITTEN_STATUS = {
    "phase": "Failed",
    "message": "pod vllm-1: CrashLoopBackOff",
    "deployment": "vllm",
    "lastUpdated": "2025-01-01T00:01:30Z",
    "lastSwitch": {
        "from": "model-a",
        "result": "failure",
        "kind": "cold",
        "startedAt": "2025-01-01T00:00:00Z",
        "finishedAt": "2025-01-01T00:01:30Z",
        "durationSeconds": 90.125,
        "reason": "pod vllm-1: CrashLoopBackOff",
    },
}


def test_the_status_the_backend_writes_is_kept_and_fills_the_printer_columns() -> None:
    obj = resource(BASE)
    obj["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    obj["status"] = copy.deepcopy(WRITTEN_STATUS)
    assert schema_errors(obj) == []
    for column in crd_version(CRD)["additionalPrinterColumns"]:
        value: Any = obj
        for key in column["jsonPath"].removeprefix(".").split("."):
            value = value[key]
        assert isinstance(value, str), column  # string and date columns alike
    success = copy.deepcopy(obj)
    del success["status"]["lastSwitch"]["from"], success["status"]["lastSwitch"]["reason"]
    success["status"]["lastSwitch"]["result"] = "success"
    assert schema_errors(success) == []


@pytest.mark.parametrize(
    "change",
    [
        {"colour": "red"},  # an unknown field would be pruned, not kept
        {"result": "maybe"},
        {"durationSeconds": -1},
        {"durationSeconds": "90s"},
        {"startedAt": None},  # required
    ],
    ids=repr,
)
def test_a_wrong_last_switch_is_rejected_by_the_schema(change: dict[str, Any]) -> None:
    obj = resource(BASE)
    obj["status"] = copy.deepcopy(WRITTEN_STATUS)
    switch = obj["status"]["lastSwitch"]
    for key, value in change.items():
        if value is None:
            del switch[key]
        else:
            switch[key] = value
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


# -- the Kubernetes example ------------------------------------------------------------------


def cluster_example() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(CLUSTER_EXAMPLE.read_text()) if d is not None]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def proxy_image() -> str:
    """Our image's one name: the tag the Dockerfile says to build, at the package's version."""
    [tag] = re.findall(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text())
    return str(tag)


def test_the_proxy_image_is_ours_and_named_once() -> None:
    assert proxy_image() == f"localhost/vllm-chill:{vllm_chill.__version__}"
    [container] = cluster_example()["Deployment", "vllm-chill"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == proxy_image()
    assert container["imagePullPolicy"] == "IfNotPresent"
    # The example says how to build it under that name.
    assert f"docker build -t {proxy_image()} ." in CLUSTER_EXAMPLE.read_text()


def test_no_file_names_another_projects_image() -> None:
    """ghcr.io/efortin/vllm-chill is not published by this project: never run it."""
    files = [ROOT / "Dockerfile", *[p.values[0] for p in SHIPPED]]
    for path in files:
        assert "ghcr.io/efortin" not in path.read_text(), path


def test_no_pod_gets_service_links() -> None:
    """A Service named `vllm` makes Kubernetes inject VLLM_PORT=tcp://..., which vLLM refuses
    at start-up (it reads VLLM_PORT as a port number); VLLM_CHILL_* are the proxy's settings."""
    deployments = {
        name: doc for (kind, name), doc in cluster_example().items() if kind == "Deployment"
    }
    assert set(deployments) == {"vllm", "vllm-chill"}
    for name, doc in deployments.items():
        assert doc["spec"]["template"]["spec"]["enableServiceLinks"] is False, name


def test_the_vllm_container_passes_the_model_as_a_flag() -> None:
    """The vllm/vllm-openai image runs `python3 -m vllm.entrypoints.openai.api_server`, which
    takes no positional model."""
    spec = cluster_example()["Deployment", "vllm"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["image"].startswith("vllm/vllm-openai:")
    assert "command" not in container
    args = container["args"]
    assert args[0].startswith("--")
    assert args[args.index("--model") + 1] == "Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8"
