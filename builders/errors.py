"""Errors of the build steps."""

from __future__ import annotations


class BuildError(RuntimeError):
    """A build step failed or its result failed a check; the message names the step and what was expected."""
