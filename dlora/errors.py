"""Errors that tell the user what to do. The CLI turns each into one line and an exit code."""

from __future__ import annotations


class DloraError(Exception):
    """Base of every error dlora raises on purpose."""


class ConfigError(DloraError):
    """A scenario or option is malformed; the message names the key path and what is allowed."""


class ProfileError(DloraError):
    """A latency profile is malformed, or a prediction falls outside its measured range."""


class WorkloadError(DloraError):
    """A trace or length file is missing, empty or malformed."""


class AdapterError(DloraError):
    """An adapter cannot be loaded or used; the message names the adapter, module and problem."""


class ModelError(DloraError):
    """A model folder is missing or malformed."""
