"""Exceptions shared across the package."""


class ModelLoadError(Exception):
    """The model directory, its config or its checkpoint cannot be served. The message says what to fix."""
