"""Turn a jina-embeddings-v3 checkpoint into a SageMaker ``model.tar.gz``.

    python -m model_package --checkpoint DIR|HUB_ID --output model.tar.gz [--upload s3://bucket/key]

The archive holds the checkpoint files at its root and ``code/``: the repository's ``inference``
package copied as ``code/jv3_inference/`` (its modules import each other relatively, so the new name
costs nothing), ``code/inference.py`` (the module SageMaker imports, re-exporting the four handler
functions, putting ``code/lib`` first on ``sys.path``), ``code/lib/`` (every dependency the PyTorch DLC
lacks, installed at package time from the pins in ``inference/requirements.txt`` for the DLC's Python
and platform, so the endpoint neither pip-installs nor reaches the network when it starts), plus
``manifest.json``. ``--no-vendor`` writes ``code/requirements.txt`` instead (the endpoint then needs PyPI).
"""

from __future__ import annotations

from .build import PackageError, build_package

__all__ = ["PackageError", "build_package"]
