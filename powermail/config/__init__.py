"""The configuration: ``powermail.toml`` loaded into typed, immutable objects."""

from powermail.config._loader import (
    Config,
    ConfigError,
    DnsSettings,
    ImapSettings,
    Listen,
    MxSettings,
    QueueSettings,
    ServerSettings,
    TlsSettings,
    load_config,
    parse_config,
)

__all__ = [
    "Config",
    "ConfigError",
    "DnsSettings",
    "Listen",
    "ImapSettings",
    "MxSettings",
    "QueueSettings",
    "ServerSettings",
    "TlsSettings",
    "load_config",
    "parse_config",
]
