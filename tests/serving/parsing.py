"""Parsing a body the way the endpoint does, for the parser tests (test_abuse_parsers, test_clients_rules)."""

from __future__ import annotations

import pytest

from inference import protocol
from inference.errors import InvalidRequest

HIDDEN = 64  # the tiny checkpoint's size: what the parsers check dimensions against


def parse(body, content_type="application/json"):
    return protocol.parse_request(body, content_type, hidden_size=HIDDEN)


def refused(body, content_type="application/json") -> InvalidRequest:
    """The error a body is refused with as a whole (a record's own error is no such refusal)."""
    with pytest.raises(InvalidRequest) as info:
        parse(body, content_type)
    return info.value
