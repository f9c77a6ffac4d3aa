"""Constructs: units with keyword-only props that expose their resources as attributes.

Named ``components`` (not ``constructs``) so that ``python app.py`` run from ``infra/`` does not shadow
the ``constructs`` library. Stacks in ``infra/stacks`` wire them, grant and output.
"""
