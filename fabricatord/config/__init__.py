"""Settings: the TOML file, environment overrides, validation (layer 1)."""

from fabricatord.config.loader import ConfigError, ConfigProblem, SettingsCheck, load
from fabricatord.config.schema import ModalityOverride, PeerSettings, RouteSettings, Settings

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "ModalityOverride",
    "PeerSettings",
    "RouteSettings",
    "Settings",
    "SettingsCheck",
    "load",
]
