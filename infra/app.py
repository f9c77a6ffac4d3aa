#!/usr/bin/env python3
"""The CDK app. ``python app.py`` (what ``make synth`` runs) writes cdk.out/ without AWS credentials;
``cdk deploy`` runs the same file through cdk.json. Settings: infra/config.py and docs/deploy.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from infra/: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aws_cdk import App, Environment, Tags, Validations  # noqa: E402
from cdk_nag import AwsSolutionsChecks, NIST80053R5Checks  # noqa: E402

from infra.config import DeploySettings, context_keys  # noqa: E402
from infra.errors import InfraConfigError  # noqa: E402
from infra.stacks import AsyncEmbeddingStack, EmbeddingStack  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Feature flags this app relies on, set here because `python app.py` does not read cdk.json.
FEATURE_FLAGS = {
    "@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy": True,
    "@aws-cdk/aws-iam:minimizePolicies": True,
    "@aws-cdk/aws-kms:reduceCrossAccountRegionPolicyScope": True,
    "@aws-cdk/core:enablePartitionLiterals": True,
}


def build_app(*, context: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
              outdir: str | None = None, nag: bool = False) -> tuple[App, list]:
    """Resolve settings and add every stack to a new App; returns the app and its stacks."""
    app = App(outdir=outdir, context={**FEATURE_FLAGS, **(context or {})})
    settings = DeploySettings.resolve({key: app.node.try_get_context(key) for key in context_keys()},
                                      environ, base_dir=REPO_ROOT)
    env = Environment(account=settings.account, region=settings.region)
    stacks = [EmbeddingStack(app, settings.stack_name, settings=settings, env=env,
                             description="jina-embeddings-v3: real-time endpoint, batch transform, alarms")]
    if settings.async_enabled:
        stacks.append(AsyncEmbeddingStack(app, f"{settings.stack_name}Async", settings=settings, env=env,
                                          description="jina-embeddings-v3: asynchronous endpoint scaling to zero"))
    for stack in stacks:
        Tags.of(stack).add("project", "jina-embeddings-v3")
    if nag:
        Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True), NIST80053R5Checks(app, verbose=True))
    return app, stacks


def main() -> int:
    outdir = os.environ.get("CDK_OUTDIR") or str(Path(__file__).resolve().parent / "cdk.out")
    nag = os.environ.get("JV3_CDK_NAG", "true").lower() not in ("0", "false", "no")
    try:
        app, _ = build_app(outdir=outdir, nag=nag)
    except InfraConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
