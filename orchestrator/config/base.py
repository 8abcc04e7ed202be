"""The base of every config: unknown keys rejected, and the error type that names the key and the fix."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it and how to fix it."""


class Strict(BaseModel):
    """Base for all configs: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=False)
