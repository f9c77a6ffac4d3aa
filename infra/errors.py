"""Errors of the CDK app: one base class, so ``app.py`` can print one line and exit 1."""

from __future__ import annotations


class InfraConfigError(ValueError):
    """A deployment setting is missing or invalid; the message names the setting and the valid choices."""
