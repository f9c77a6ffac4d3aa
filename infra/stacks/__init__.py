"""Stacks: wire the components, grant, output. ``EmbeddingStack`` (real-time + batch) and ``AsyncEmbeddingStack``."""

from .async_stack import AsyncEmbeddingStack
from .embedding_stack import EmbeddingStack

__all__ = ["AsyncEmbeddingStack", "EmbeddingStack"]
