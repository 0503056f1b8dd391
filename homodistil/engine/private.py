"""Owner-only directories for what a run keeps that no one else should read or change:
checkpoints (weights, optimizer state, the data position), token caches of the run's text and
prepared teachers.

Explicit modes on the directories we create, rather than a process-wide ``os.umask(0o077)`` in
the CLI: a umask would also make private what is meant to be shared (the exported model, reports,
TensorBoard logs, DeepSpeed's compiled-op cache), would miss the recipe run from Python (the tests,
``compare``'s jobs) and would leak into every later command of a process that calls the CLI more
than once. A private directory is enough: its files, whatever their own mode, cannot be reached
by anyone else.
"""
from __future__ import annotations

from pathlib import Path

PRIVATE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` (and any missing parents, with the usual mode) readable and writable by its
    owner only; return it. A directory that already exists keeps its mode: ``data.cache_dir`` or
    ``model.prepare.cache_dir`` may be shared on purpose."""
    path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    return path
