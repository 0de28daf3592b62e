"""loopline configuration: typed settings from LOOPLINE_* environment variables."""

from __future__ import annotations

from config.settings import ConfigError, Settings

__all__ = ["ConfigError", "Settings"]
