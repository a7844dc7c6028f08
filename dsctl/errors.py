"""Exceptions raised by dsctl on bad user input.

The library raises these and never prints or exits; the CLI turns each into one red line and exit code 1.
"""

from __future__ import annotations


class DsctlError(Exception):
    """Base of every error dsctl raises on bad user input (recipes, widths, files, data)."""


class SpecError(DsctlError, ValueError):
    """A sub-network spec or width that is not in the model's search space."""


class RecipeError(DsctlError, ValueError):
    """A recipe file or override that does not match the schema."""


class DataError(DsctlError):
    """Data that cannot be found or read."""


class CheckpointError(DsctlError):
    """A checkpoint or exported file that cannot be read or does not match."""
