"""The typed request and result that sit between the wire formats and the engine.

Every wire format (Jina, OpenAI, TEI, JSON Lines, CSV) parses into ``EmbedRequest`` and writes an
``EmbedResult``; the engine never sees JSON. ``EmbedRequest.validate`` is the single place where a
request's values are checked, so every format gives the same error for the same mistake.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequest
from .settings import ENCODINGS, TASKS


@dataclass
class EmbedRequest:
    texts: list[str]
    task: str | None = None  # None: the deployment's default task
    dimensions: int | None = None  # None: the deployment's default (full size unless configured)
    late_chunking: bool = False
    normalized: bool = True
    truncate: bool = True  # False: texts over the token limit are refused instead of truncated
    encoding: str | None = None  # None: the deployment's default encoding
    ids: list | None = None  # the caller's record ids, echoed back

    def validate(self, *, hidden_size: int, tasks: tuple[str, ...] = TASKS) -> None:
        """Raise ``InvalidRequest`` naming the first bad value; return quietly when all is well."""
        if not isinstance(self.texts, list) or not self.texts:
            raise InvalidRequest("no texts to embed: expected a non-empty list of strings", field="texts")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"text {i} is {type(text).__name__} {_short(text)}, expected a string", field=f"texts[{i}]"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequest(
                    f"text {i} is not valid Unicode: {exc.reason} at character {exc.start} "
                    f"({text[exc.start]!r}); lone surrogates cannot be embedded",
                    field=f"texts[{i}]",
                ) from None
        if self.task is not None and self.task not in tasks:
            if isinstance(self.task, str) and self.task in TASKS:
                raise InvalidRequest(
                    f"task {self.task!r} is not loaded on this endpoint; loaded: {', '.join(tasks)}", field="task"
                )
            raise InvalidRequest(
                f"unknown task {_short(self.task)}; expected one of {', '.join(tasks)}", field="task"
            )
        if self.dimensions is not None:
            if isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int):
                raise InvalidRequest(
                    f"dimensions must be an integer from 1 to {hidden_size}, got {_short(self.dimensions)}",
                    field="dimensions",
                )
            if not 1 <= self.dimensions <= hidden_size:
                raise InvalidRequest(
                    f"dimensions {_short(self.dimensions)} is out of range; expected 1 to {hidden_size}", field="dimensions"
                )
        for name in ("late_chunking", "normalized", "truncate"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise InvalidRequest(f"{name} must be true or false, got {_short(value)}", field=name)
        if self.encoding is not None and self.encoding not in ENCODINGS:
            raise InvalidRequest(
                f"unknown embedding type {_short(self.encoding)}; expected one of {', '.join(ENCODINGS)}",
                field="embedding_type",
            )
        if self.ids is not None and len(self.ids) != len(self.texts):
            raise InvalidRequest(f"{len(self.ids)} ids for {len(self.texts)} texts", field="ids")


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # (n, d) float32: pooled, truncated, normalised unless asked not to
    token_counts: list[int]  # tokens the model saw per text (for late chunking: per document, on text 0)
    encoding: str = "float"
    ids: list | None = None
    extra: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return int(sum(self.token_counts))


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
