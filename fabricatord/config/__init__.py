"""Settings: the TOML file, environment overrides, validation (layer 1)."""

from fabricatord.config.loader import ConfigError, ConfigProblem, Located, SettingsCheck, load, locate
from fabricatord.config.schema import ModalityOverride, PeerSettings, ProxySettings, RouteSettings, Settings

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "Located",
    "ModalityOverride",
    "PeerSettings",
    "ProxySettings",
    "RouteSettings",
    "Settings",
    "SettingsCheck",
    "load",
    "locate",
]
