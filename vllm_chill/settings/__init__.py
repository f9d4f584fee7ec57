"""Everything vllm-chill can be told, in one typed object, and `vllm-chill serve`'s flags for it.

`Settings` holds one frozen group per concern; each default is written once, beside its flag,
its `VLLM_CHILL_*` variable and its help text (`_schema.py`). `parse_settings` reads the flags
and the environment into it, checking every value and naming the flag in a one-line error.
"""

from vllm_chill.settings._parse import (
    OPTIONS,
    Option,
    Parser,
    add_serve_arguments,
    parse_settings,
    serve_parser,
    settings_from_namespace,
)
from vllm_chill.settings._schema import (
    BackendName,
    KubernetesSettings,
    LimitsSettings,
    LocalSettings,
    LoggingSettings,
    SecuritySettings,
    ServerSettings,
    Settings,
    SimSettings,
    SleepSettings,
    SwitchingSettings,
    UpstreamSettings,
    env_name,
)
from vllm_chill.settings._values import SettingsError, one_line, parse_duration, parse_size

__all__ = [
    "OPTIONS",
    "BackendName",
    "KubernetesSettings",
    "LimitsSettings",
    "LocalSettings",
    "LoggingSettings",
    "Option",
    "Parser",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "SimSettings",
    "SleepSettings",
    "SwitchingSettings",
    "UpstreamSettings",
    "add_serve_arguments",
    "env_name",
    "one_line",
    "parse_duration",
    "parse_settings",
    "parse_size",
    "serve_parser",
    "settings_from_namespace",
]
