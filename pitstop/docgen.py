"""Reference sections of docs/ generated from the settings tables that define them (recipes, the daemon's
configuration), so the docs cannot drift from the code: a test checks each generated section is current."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

END = "<!-- END GENERATED -->"


def begin_marker(source: str, module: str, doc: str) -> str:
    return f"<!-- BEGIN GENERATED from {source} by `python -m {module} {doc}` -->"


def splice(doc: str, begin: str, generated: str) -> str:
    """`doc` with the section between `begin` and END replaced by `generated`."""
    start = doc.index("\n", doc.index(begin)) + 1
    end = doc.index(END)
    return doc[:start] + "\n" + generated + "\n" + doc[end:]


def main(argv: Sequence[str] | None, module: str, doc_name: str, splice_docs: Callable[[str], str]) -> int:
    """`python -m MODULE DOC`: regenerate DOC's reference section in place."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write(f"usage: python -m {module} {doc_name}\n")
        return 2
    doc = Path(args[0])
    doc.write_text(splice_docs(doc.read_text()))
    return 0
