"""Reproducible held-out English text for the gate tables (no download).

``heldout_english()`` builds a plain-text corpus from English prose files that every CPython install
ships: the IDLE user guide (``idlelib/help.html``, tags stripped), IDLE's README and HISTORY, and the
Python license. None of it is in ``builtin:pydoc`` (the default evaluation and calibration corpus), so
a model pruned or quantized with pydoc calibration is scored here on text it never saw.

    .venv/bin/python -m benchmarks.corpora            # writes the file, prints path, tokens-independent stats

The text depends on the Python version (its files change between releases); the sha256 of the text is
printed and should be reported with any number measured on it.
"""
from __future__ import annotations

import hashlib
import html.parser
import os
import re
import sys
import sysconfig
from pathlib import Path

FILES = ("idlelib/help.html", "idlelib/README.txt", "idlelib/HISTORY.txt", "LICENSE.txt")


class _Text(html.parser.HTMLParser):
    """Visible text of an HTML page: drops <script>/<style>/<head>, one paragraph per block element."""

    BLOCK = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "pre", "tr", "br", "section"}
    SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _html_text(raw: str) -> str:
    p = _Text()
    p.feed(raw)
    text = "".join(p.parts)
    paras = [" ".join(block.split()) for block in re.split(r"\n\s*\n", text)]
    return "\n\n".join(x for x in paras if x)


def heldout_text() -> str:
    """The held-out English text (a string), built from files of the running Python's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in FILES:
        f = stdlib / rel
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing from this Python install; the held-out corpus needs it")
        raw = f.read_text(encoding="utf-8")
        if f.suffix == ".html":
            raw = _html_text(raw)
            start = raw.find("Source code: Lib/idlelib/")  # skip the page's navigation sidebar
            end = raw.rfind("\n\nTable of Contents")  # and the footer that repeats it
            raw = raw[start if start >= 0 else 0:end if end > start else None]
        parts.append(raw.strip())
    return "\n\n".join(parts) + "\n"


def heldout_english(path: str | os.PathLike | None = None) -> Path:
    """Write the held-out text to ``path`` (default: a file under $KILN_CACHE or ~/.cache/llmkiln) and return it.

    Pass the returned path as a corpus spec (``--text PATH``) to perplexity.
    """
    text = heldout_text()
    if path is None:
        root = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "llmkiln")
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        path = root / "corpora" / f"heldout-english-{digest}.txt"
    path = Path(path)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def describe(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return {"path": str(path), "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "python": sys.version.split()[0], "files": list(FILES)}


if __name__ == "__main__":
    import json

    print(json.dumps(describe(heldout_english(sys.argv[1] if len(sys.argv) > 1 else None))))
