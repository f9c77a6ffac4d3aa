"""The CDK app that deploys jina-embeddings-v3: constructs in ``components``, stacks in ``stacks``.

``config`` resolves every setting (CDK context → ``JV3_*`` environment variable → default); ``app.py``
builds the stacks from it. The endpoint container reads the runtime ``JV3_*`` names of
``inference/settings.py``; this package only sets them.
"""
