"""Output encodings of an embedding, as Jina's embeddings API defines them.

- ``float``: the float32 vector as numbers.
- ``base64``: the vector's little-endian float32 bytes, base64-encoded (4·d bytes → a third smaller than JSON).
- ``ubinary``: one bit per dimension (1 where the value is > 0), packed eight to a byte, as uint8
  (d/8 numbers, rounded up).
- ``binary``: the same bytes shifted by -128 into int8, which is what Jina's API returns.
"""

from __future__ import annotations

import base64

import numpy as np

from .errors import InvalidRequest
from .settings import ENCODINGS


def encode_matrix(embeddings: np.ndarray, encoding: str) -> np.ndarray | list[str]:
    """Encode each row; returns an array (float32, int8 or uint8) or, for base64, a list of strings."""
    matrix = np.asarray(embeddings, dtype=np.float32)
    if encoding == "float":
        return matrix
    if encoding == "base64":
        little = matrix.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    if encoding == "ubinary":
        return np.packbits(matrix > 0, axis=-1)
    if encoding == "binary":
        return (np.packbits(matrix > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    raise InvalidRequest(f"unknown embedding type {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def decode_base64(text: str) -> np.ndarray:
    """The inverse of the base64 encoding (used by tests and by the client)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)
