"""Turn a jina-embeddings-v3 checkpoint into a SageMaker ``model.tar.gz``.

    python -m model_package --checkpoint DIR|HUB_ID --output model.tar.gz [--upload s3://bucket/key]

The archive holds the checkpoint files at its root and ``code/``: the repository's ``inference``
package copied as ``code/jv3_inference/`` (its modules import each other relatively, so the new name
costs nothing), ``code/inference.py`` (the module SageMaker imports, re-exporting the four handler
functions), ``code/requirements.txt`` and ``code/wheels/`` (every dependency the PyTorch DLC lacks,
installed with ``--no-index`` so an endpoint without internet starts), plus ``manifest.json``.
"""

from __future__ import annotations

from .build import PackageError, build_package

__all__ = ["PackageError", "build_package"]
