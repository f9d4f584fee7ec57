"""`vllm-chill serve` settings: flags, environment twins, defaults and one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from vllm_chill._build import build_parts
from vllm_chill.settings import (
    OPTIONS,
    Settings,
    SettingsError,
    SwitchingSettings,
    parse_duration,
    parse_settings,
    parse_size,
)

SIM = ["--backend", "sim", "--models", "models.yaml"]


def parse(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, *, pod: str | None = None
) -> Settings:
    return parse_settings(
        argv, environ or {}, pod_namespace_file=pod or "/nonexistent/vllm-chill/namespace"
    )


def error(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        parse(argv, environ)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.prog == "vllm-chill serve"
    return message


# --- durations and sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("90", 90.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (" 2m ", 120.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-5", "-5m", "abc", "", "5 parsecs", "inf", "nan", "1e400"])
def test_bad_durations_name_the_flag(text: str) -> None:
    message = error([*SIM, f"--idle-timeout={text}"])
    assert message.startswith("argument --idle-timeout: invalid duration")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("64MiB", 64 << 20),
        ("64M", 64 << 20),
        ("500KB", 500_000),
        ("1g", 1 << 30),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_duration_flags_accept_every_documented_form() -> None:
    settings = parse(
        [
            *SIM,
            "--model-switch-timeout",
            "1h30m",
            "--idle-timeout",
            "250ms",
            "--max-wait",
            "30s",
            "--drain-timeout",
            "5m",
            "--sim-load-time",
            "2",
        ]
    )
    assert settings.switching.model_switch_timeout == 5400
    assert settings.switching.idle_timeout == 0.25
    assert settings.switching.max_wait == 30
    assert settings.switching.drain_timeout == 300
    assert settings.sim.load_time == 2


def test_a_zero_switch_timeout_is_refused() -> None:
    assert "--model-switch-timeout" in error([*SIM, "--model-switch-timeout", "0"])


# --- defaults -----------------------------------------------------------------------------


def test_the_example_command() -> None:
    settings = parse(
        [
            "--enable-model-switch",
            "--configmap",
            "vllm-config",
            "--namespace",
            "ai-apps",
            "--deployment",
            "vllm",
            "--model-switch-timeout",
            "5m",
        ]
    )
    assert settings.backend == "kubernetes"
    assert settings.kubernetes.enable_model_switch is True
    assert settings.kubernetes.configmap == "vllm-config"
    assert settings.kubernetes.namespace == "ai-apps"
    assert settings.kubernetes.deployments == ("vllm",)
    assert settings.upstream.urls == ("http://vllm.ai-apps.svc:8000",)
    assert settings.switching.model_switch_timeout == 300
    assert settings.models == ()
    assert settings.warnings == ()


def test_the_documented_defaults() -> None:
    settings = parse(SIM)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
    assert settings.models == ("models.yaml",)
    assert settings.kubernetes.enable_model_switch is False
    assert settings.switching.model_switch_timeout == 300
    assert settings.switching.idle_timeout == 300
    assert settings.switching.max_wait == 0
    assert settings.switching.drain_timeout == 120
    assert settings.security.api_keys == ()
    assert settings.security.admin_token is None
    assert settings.upstream.api_key is None
    assert settings.local.command == "vllm serve {model} {args} --host 127.0.0.1 --port {port}"
    assert (settings.sim.load_time, settings.sim.tokens_per_second) == (3, 50)
    assert (settings.logging.level, settings.logging.format) == ("info", "text")
    assert settings.logging.access_log is False
    assert settings.upstream.urls == ()  # only the kubernetes backend has them


def test_the_backend_is_required_without_a_deployment() -> None:
    message = error(["--models", "m.yaml"])
    assert message.startswith("argument --backend: required")


@pytest.mark.parametrize("backend", ["sim", "local"])
def test_models_are_required_with_file_backends(backend: str) -> None:
    assert error(["--backend", backend]).startswith("argument --models: required")


def test_kubernetes_needs_a_deployment() -> None:
    assert error(["--backend", "kubernetes"]).startswith("argument --deployment: required")


def test_the_namespace_comes_from_the_pod(tmp_path: Path) -> None:
    pod = tmp_path / "namespace"
    pod.write_text("ai-apps\n")
    settings = parse(["--deployment", "vllm"], pod=str(pod))
    assert settings.kubernetes.namespace == "ai-apps"
    assert settings.upstream.urls == ("http://vllm.ai-apps.svc:8000",)
    assert (
        parse(["--deployment", "vllm"], pod=str(tmp_path / "absent")).kubernetes.namespace
        == "default"
    )


@pytest.mark.parametrize(
    ("argv", "upstream"),
    [
        (["--upstream", "http://vllm-svc:8001/"], "http://vllm-svc:8001"),
        (["--target-host", "10.0.0.5"], "http://10.0.0.5:8000"),
        (["--target-port", "9000"], "http://vllm.ns.svc:9000"),
        (["--target-host", "fd00::5", "--target-port", "9000"], "http://[fd00::5]:9000"),
    ],
)
def test_upstream(argv: list[str], upstream: str) -> None:
    settings = parse(["--deployment", "vllm", "--namespace", "ns", *argv])
    assert settings.upstream.urls == (upstream,)


def test_upstream_and_target_exclude_each_other() -> None:
    message = error(["--deployment", "d", "--upstream", "http://x:1", "--target-host", "y"])
    assert message.startswith("argument --upstream:")


# --- environment twins ----------------------------------------------------------------------


def test_every_flag_has_its_environment_twin() -> None:
    assert {o.env for o in OPTIONS} >= {
        "VLLM_CHILL_HOST",
        "VLLM_CHILL_PORT",
        "VLLM_CHILL_BACKEND",
        "VLLM_CHILL_MODELS",
        "VLLM_CHILL_ENABLE_MODEL_SWITCH",
        "VLLM_CHILL_NAMESPACE",
        "VLLM_CHILL_DEPLOYMENT",
        "VLLM_CHILL_CONTAINER",
        "VLLM_CHILL_CONFIGMAP",
        "VLLM_CHILL_KUBECONFIG",
        "VLLM_CHILL_UPSTREAM",
        "VLLM_CHILL_TARGET_HOST",
        "VLLM_CHILL_TARGET_PORT",
        "VLLM_CHILL_MODEL_SWITCH_TIMEOUT",
        "VLLM_CHILL_IDLE_TIMEOUT",
        "VLLM_CHILL_MAX_WAIT",
        "VLLM_CHILL_DRAIN_TIMEOUT",
        "VLLM_CHILL_API_KEY",
        "VLLM_CHILL_ADMIN_TOKEN",
        "VLLM_CHILL_UPSTREAM_API_KEY",
        "VLLM_CHILL_COMMAND",
        "VLLM_CHILL_SIM_LOAD_TIME",
        "VLLM_CHILL_SIM_TOKENS_PER_SECOND",
        "VLLM_CHILL_LOG_LEVEL",
        "VLLM_CHILL_LOG_FORMAT",
    }


def test_the_example_command_from_the_environment() -> None:
    settings = parse(
        [],
        {
            "VLLM_CHILL_ENABLE_MODEL_SWITCH": "true",
            "VLLM_CHILL_CONFIGMAP": "vllm-config",
            "VLLM_CHILL_NAMESPACE": "ai-apps",
            "VLLM_CHILL_DEPLOYMENT": "vllm",
            "VLLM_CHILL_MODEL_SWITCH_TIMEOUT": "5m",
        },
    )
    assert settings == parse(
        [
            "--enable-model-switch",
            "--configmap=vllm-config",
            "--namespace=ai-apps",
            "--deployment=vllm",
            "--model-switch-timeout=5m",
        ]
    )


def test_the_flag_wins_over_the_environment() -> None:
    environ = {
        "VLLM_CHILL_BACKEND": "local",
        "VLLM_CHILL_MODELS": "a.yaml",
        "VLLM_CHILL_PORT": "9000",
        "VLLM_CHILL_IDLE_TIMEOUT": "10m",
        "VLLM_CHILL_ACCESS_LOG": "yes",
    }
    from_env = parse([], environ)
    assert (from_env.backend, from_env.models) == ("local", ("a.yaml",))
    assert from_env.server.port == 9000
    assert (from_env.switching.idle_timeout, from_env.logging.access_log) == (600, True)
    flags = parse(
        [
            "--backend=sim",
            "--models=b",
            "--models=c",
            "--port=1",
            "--idle-timeout=0",
            "--no-access-log",
        ],
        environ,
    )
    assert (flags.backend, flags.models, flags.server.port) == ("sim", ("b", "c"), 1)
    assert (flags.switching.idle_timeout, flags.logging.access_log) == (0, False)


def test_repeatable_flags_take_comma_separated_values() -> None:
    settings = parse(
        [], {**_sim_env(), "VLLM_CHILL_MODELS": "a.yaml, b/ ,", "VLLM_CHILL_API_KEY": "k1,k2"}
    )
    assert settings.models == ("a.yaml", "b/")
    assert settings.security.api_keys == ("k1", "k2")


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_boolean_words(word: str, value: bool) -> None:
    settings = parse(["--deployment", "d"], {"VLLM_CHILL_ENABLE_MODEL_SWITCH": word})
    assert settings.kubernetes.enable_model_switch is value


def test_empty_variables_count_as_unset() -> None:
    settings = parse(SIM, {"VLLM_CHILL_PORT": "", "VLLM_CHILL_ADMIN_TOKEN": " "})
    assert (settings.server.port, settings.security.admin_token) == (8080, None)


def test_a_kubernetes_service_link_is_not_a_port() -> None:
    """A Service named vllm-chill makes Kubernetes set VLLM_CHILL_PORT=tcp://...; ignore it."""
    environ = {
        **_sim_env(),
        "VLLM_CHILL_PORT": "tcp://10.96.0.12:8080",
        "VLLM_CHILL_SERVICE_HOST": "10.96.0.12",
        "VLLM_CHILL_SERVICE_PORT": "8080",
        "VLLM_CHILL_PORT_8080_TCP_ADDR": "10.96.0.12",
    }
    settings = parse([], environ)
    assert settings.server.port == 8080
    assert settings.warnings == ()


def test_unknown_variables_and_unused_flags_are_warned_about() -> None:
    settings = parse([*SIM, "--deployment", "vllm"], {"VLLM_CHILL_IDLE_TIMOUT": "1m"})
    assert settings.warnings == (
        "ignoring unknown environment variable VLLM_CHILL_IDLE_TIMOUT",
        "--deployment is not used by the sim backend",
    )


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("VLLM_CHILL_PORT", "http", "--port"),
        ("VLLM_CHILL_PORT", "70000", "--port"),
        ("VLLM_CHILL_IDLE_TIMEOUT", "soon", "--idle-timeout"),
        ("VLLM_CHILL_MAX_WAIT", "-1", "--max-wait"),
        ("VLLM_CHILL_BACKEND", "docker", "--backend"),
        ("VLLM_CHILL_ENABLE_MODEL_SWITCH", "maybe", "--enable-model-switch"),
        ("VLLM_CHILL_LOG_FORMAT", "xml", "--log-format"),
        ("VLLM_CHILL_SIM_TOKENS_PER_SECOND", "-3", "--sim-tokens-per-second"),
        ("VLLM_CHILL_MAX_BODY_SIZE", "lots", "--max-body-size"),
    ],
)
def test_bad_environment_values_name_the_flag_and_the_variable(
    variable: str, value: str, flag: str
) -> None:
    message = error([], {**_sim_env(), variable: value})
    assert message.startswith(f"argument {flag} (from {variable}): ")
    assert repr(value) in message


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "x"], "--port"),
        (["--port", "-1"], "--port"),
        (["--backend", "docker"], "--backend"),
        (["--log-level", "loud"], "--log-level"),
        (["--max-waiting", "0"], "--max-waiting"),
        (["--api-key", ""], "--api-key"),
        (["--host", " "], "--host"),
        (["--sim-load-time"], "--sim-load-time"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], flag: str) -> None:
    assert f"argument {flag}" in error([*SIM, *argv])


def test_a_bad_command_template_names_the_flag_before_anything_starts() -> None:
    settings = parse(["--backend", "local", "--models", "m.yaml", "--command", 'vllm "serve'])
    with pytest.raises(SettingsError, match=r"^argument --command: "):
        build_parts(settings)


def test_unknown_flags_are_named() -> None:
    assert error([*SIM, "--idle-timout", "5m"]) == "unrecognized arguments: --idle-timout 5m"


# --- secrets and options --------------------------------------------------------------------


def test_secrets_never_appear_in_the_repr() -> None:
    settings = parse(
        [
            *SIM,
            "--api-key",
            "client-secret-1",
            "--admin-token",
            "admin-secret-2",
            "--upstream-api-key",
            "vllm-secret-3",
        ]
    )
    for text in (repr(settings), str(settings), repr(settings.security), repr(settings.upstream)):
        for secret in ("client-secret-1", "admin-secret-2", "vllm-secret-3"):
            assert secret not in text
    assert settings.secrets() == ("client-secret-1", "admin-secret-2", "vllm-secret-3")


def test_errors_about_secrets_do_not_repeat_them() -> None:
    message = error([*SIM, "--api-key", "   "])
    assert message == "argument --api-key: must not be empty"


def test_flags_land_in_their_groups() -> None:
    settings = parse(
        [
            *SIM,
            "--idle-timeout=0",
            "--max-wait=1m",
            "--drain-timeout=10s",
            "--min-residency=0",
            "--first-load-estimate=90s",
            "--max-waiting=7",
            "--max-body-size=1MiB",
            "--upstream-connect-timeout=2s",
            "--api-key=k",
            "--admin-token=t",
            "--upstream-api-key=u",
        ]
    )
    assert settings.switching == SwitchingSettings(
        idle_timeout=0, max_wait=60, drain_timeout=10, min_residency=0, first_load_estimate=90
    )
    assert (settings.limits.max_waiting, settings.limits.max_body_size) == (7, 1 << 20)
    assert (settings.security.api_keys, settings.security.admin_token) == (("k",), "t")
    assert (settings.upstream.api_key, settings.upstream.connect_timeout) == ("u", 2)


def test_no_flags_means_the_library_defaults() -> None:
    """What `vllm-chill serve` runs with by default is what `Settings()` holds: one default."""
    assert parse(SIM) == Settings(backend="sim", models=("models.yaml",))


def test_every_setting_has_a_flag_an_environment_twin_and_help() -> None:
    flags = [o.flag for o in OPTIONS]
    assert len(flags) == len(set(flags))
    for option in OPTIONS:
        assert option.env == "VLLM_CHILL_" + option.flag[2:].upper().replace("-", "_")
        assert option.meta.help
        assert option.help_text().endswith(f"[env {option.env}]")
    for f in dataclasses.fields(Settings):
        group = getattr(Settings(), f.name)
        if dataclasses.is_dataclass(group):
            for inner in dataclasses.fields(group):
                assert "flag" in inner.metadata, f"{f.name}.{inner.name} has no flag"


def test_help_shows_each_default_as_it_is_written_on_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_chill", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    help_text = " ".join(result.stdout.split())
    for expected in (
        "(default 5m) [env VLLM_CHILL_IDLE_TIMEOUT]",
        "(default 500ms) [env VLLM_CHILL_QUIET_GAP]",
        "(default 64MiB) [env VLLM_CHILL_MAX_BODY_SIZE]",
        "(default 1000) [env VLLM_CHILL_MAX_WAITING]",
        "(default off) [env VLLM_CHILL_ENABLE_MODEL_SWITCH]",
        "(default 'vllm serve {model} {args} --host 127.0.0.1 --port {port}') [env "
        "VLLM_CHILL_COMMAND]",
    ):
        assert expected in help_text


def test_the_readme_documents_every_flag() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    missing = [o.flag for o in OPTIONS if f"`{o.flag}" not in table]
    assert missing == []


def _sim_env() -> dict[str, str]:
    return {"VLLM_CHILL_BACKEND": "sim", "VLLM_CHILL_MODELS": "models.yaml"}


def test_models_without_switching_on_kubernetes_is_warned_about() -> None:
    settings = parse(["--deployment", "vllm", "--models", "m.yaml"])
    assert settings.warnings == (
        "--models is not used without --enable-model-switch: only the Deployment's current "
        "model is served",
    )
