"""MkDocs hook: the dated records of benchmarks/ become pages of the site.

Every ``benchmarks/<name>-YYYY-MM-DD/`` directory and ``benchmarks/<name>-YYYY-MM-DD.md`` file
is published under ``records/``: its Markdown as pages (a directory's README.md is its index),
its figures and HTML reports as they are. The records stay where they are committed, the site
shows them as committed, and ``mkdocs build --strict`` checks their links like any page's.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

DATED = re.compile(r".+-\d{4}-\d{2}-\d{2}(\.md)?$")
PUBLISHED = {".md", ".png", ".html", ".svg"}
ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def records() -> list[Path]:
    """The dated records, oldest name first."""
    return sorted(p for p in BENCHMARKS.iterdir() if DATED.fullmatch(p.name))


def on_files(files: Files, config) -> Files:
    for record in records():
        sources = [record] if record.is_file() else sorted(
            p for p in record.rglob("*") if p.is_file() and p.suffix in PUBLISHED)
        for src in sources:
            uri = "records/" + src.relative_to(BENCHMARKS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(src)))
    return files
