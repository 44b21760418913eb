"""Typed settings loaded once (TOML file + environment), validated with clear errors."""

from heartloop.config.settings import (
    AllowedCaller,
    ConfigError,
    Destination,
    Settings,
    load_settings,
    settings_to_dict,
)

__all__ = ["AllowedCaller", "ConfigError", "Destination", "Settings", "load_settings", "settings_to_dict"]
