"""Everything that runs inside a jina-embeddings-v3 SageMaker endpoint.

Modules use relative imports only, so the packager can copy this folder into the archive's
``code/`` under another name (see ``model_package``) without a clash with SageMaker's
``inference.py`` entry module.
"""
