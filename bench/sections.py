"""One benchmark's section of a shared results file, replaced in place."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, headings: tuple[str, ...]) -> None:
    """Put ``section`` where the first of ``headings`` found in ``path`` stands (up to the next ``## ``
    heading), or append it; everything else in the file is kept. ``headings``: the section's heading,
    then any it had before, so that a renamed section replaces its old self."""
    text = path.read_text() if path.exists() else ""
    heading = next((h for h in headings if h in text), None)
    if heading:
        before, after = text.split(heading, 1)
        rest = after.find("\n## ")
        text = before + section + (after[rest + 1 :] if rest >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
