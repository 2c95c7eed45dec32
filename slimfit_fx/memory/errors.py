"""The memory package's one error type.

Takes nothing; gives ``PlanError``, raised for a bad argument to a plan query.  Imports nothing,
so every module of the package can raise it without an import cycle.
"""
from __future__ import annotations


class PlanError(ValueError):
    """Bad argument to a plan query (unknown parameter name, unknown optimizer)."""
