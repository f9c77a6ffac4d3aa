"""``python -m model_package``: the packager's command line (``jv3 package`` delegates here)."""

from __future__ import annotations

import argparse
import sys

from .build import ALLOWED_NAMES, DEFAULT_PLATFORMS, DEFAULT_PYTHON, Interrupted, PackageError, build_package
from .upload import upload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_package", description="Build model.tar.gz for SageMaker.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face Hub id")
    parser.add_argument("--output", default="model.tar.gz", help="archive to write (atomically)")
    parser.add_argument("--upload", metavar="S3_URI", help="then upload to s3://bucket/key (multipart, checksummed)")
    parser.add_argument("--no-vendor", action="store_true", help="leave code/lib/ out and write code/requirements.txt (the endpoint then pip-installs from PyPI)")
    parser.add_argument("--wheel-cache", help="where downloaded wheels are kept (default ~/.cache/jv3/wheels)")
    parser.add_argument("--find-links", help="also look for wheels here (offline vendoring)")
    parser.add_argument("--no-index", action="store_true", help="vendor from --find-links/--wheel-cache only")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON, help="the DLC's Python (default %(default)s)")
    parser.add_argument("--platform", action="append", help="wheel platform tag, repeatable (default: every manylinux tag of glibc 2.35, the DLC's Ubuntu 22.04)")
    parser.add_argument("--revision", help="Hub revision when --checkpoint is a Hub id")
    parser.add_argument(
        "--include", action="append", default=[], metavar="GLOB",
        help="also pack the checkpoint files this glob matches (a path relative to the checkpoint, or a folder), "
        f"repeatable; by default only what the endpoint reads is packed: {', '.join(ALLOWED_NAMES[:4])}, ..., "
        "the safetensors weights (and their index) and the adapter folders",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        path = build_package(
            args.checkpoint,
            args.output,
            vendor=not args.no_vendor,
            wheel_cache=args.wheel_cache,
            find_links=args.find_links,
            no_index=args.no_index,
            python_version=args.python_version,
            platforms=tuple(args.platform or DEFAULT_PLATFORMS),
            revision=args.revision,
            include=args.include,
            notify=print,
        )
        print(f"wrote {path}")
        if args.upload:
            print(f"uploaded {upload(path, args.upload)}")
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as stop:  # the build removed its staging folder and partial archive on the way out
        print(f"error: {stop}; nothing was written to {args.output} and no temp file was left", file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
