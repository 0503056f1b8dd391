"""Opening a checkpoint runs no code from it, and nothing it holds leads outside it (issue 27).

One real checkpoint (the tiny run, 2 steps at ZeRO-2, so it has an optimizer shard too) is built
once and copied per case. A file replaced by a pickle that creates a marker file when unpickled,
its manifest entry forged to match (an attacker can), stops resuming and exporting with one line
naming it and exit code 2; the marker is never created (evaluate, which reads exported models,
never unpickles their weights). ``latest`` or a manifest naming a path outside the checkpoint
never leads a command there; checkpoints and the token cache are owner-only.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch

from homodistil.cli import main
from homodistil.engine import checkpoint

from conftest import tiny_overrides

RUN = ["trainer.max_steps=2", "pruning.t_f=2", "pruning.mask_interval=10", "pruning.shrink_interval=1000",
       "trainer.save_every=2", "deepspeed.zero_optimization.stage=2"]
TAG = "step00000002"
FILES = ["mp_rank_00_model_states.pt", "pruner.pt", "rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


class Payload:
    """Unpickled, this creates ``marker``: what a planted checkpoint file would run (any call would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A finished tiny run with one complete checkpoint, written under the usual umask 022 (so
    that only our own modes can make its directories private)."""
    out = tmp_path_factory.mktemp("built") / "run"
    umask = os.umask(0o022)
    try:
        assert main(["distill", "configs/tiny.yaml", *tiny_overrides(out), *RUN]) == 0
    finally:
        os.umask(umask)
    return out


@pytest.fixture
def run(built, tmp_path) -> Path:
    """This case's copy of the built run (beside it in ``tmp_path``: room for a victim directory)."""
    return Path(shutil.copytree(built, tmp_path / "run"))


def distill(run: Path) -> int:
    return main(["distill", "configs/tiny.yaml", *tiny_overrides(run), *RUN])


def plant(directory: Path, name: str, marker: Path) -> Path:
    """Replace ``name`` with the payload and forge its manifest entry, as an attacker can."""
    path = directory / name
    torch.save(Payload(marker), path)
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": path.stat().st_size, "crc32": checkpoint.checksum(path)}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("homodistil: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-4000:]
    return lines[0]


def test_the_payload_runs_code_when_unpickled_unguarded(tmp_path):
    """The cases below can fail: the planted file runs its call when torch loads it the old way."""
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "planted.pt")
    torch.load(tmp_path / "planted.pt", weights_only=False)
    assert marker.exists()


def test_every_file_of_a_real_checkpoint_passes_the_safe_loader(built):
    directory = built / "checkpoints" / TAG
    assert sorted(p.name for p in directory.glob("*.pt")) == FILES
    checkpoint.check_loadable(directory)
    rank = checkpoint.safe_load(directory / "rank0.pt")
    assert rank["rng"]["numpy"][1].dtype.name == "uint32"  # numpy's RNG state: the allow-listed types


@pytest.mark.parametrize("command", ["distill", "export"])
@pytest.mark.parametrize("name", FILES)
def test_a_planted_pickle_is_refused_before_it_runs(run, tmp_path, capsys, name, command):
    marker = tmp_path / "marker"
    path = plant(run / "checkpoints" / TAG, name, marker)
    capsys.readouterr()
    code = distill(run) if command == "distill" else main(["export", str(run), str(tmp_path / "exported")])
    err = one_error_line(capsys.readouterr().err)
    assert code == 2 and err == (f"homodistil: error: refused to load {path}: it asks to call io.open, and a "
                                 "checkpoint holds only tensors and plain data (nothing in it was run)"), err
    assert not marker.exists()
    assert not (tmp_path / "exported").exists()


def test_a_planted_plain_pickle_is_refused_before_it_runs(run, tmp_path, capsys):
    """torch also reads its old format, a bare pickle: the check refuses it (it cannot be memory-mapped)."""
    marker = tmp_path / "marker"
    path = run / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    path.write_bytes(pickle.dumps(Payload(marker)))
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "exported")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"homodistil: error: refused to load {path}: not a torch.save archive (nothing in it was run)")
    assert not marker.exists()


def test_evaluate_never_unpickles_a_models_weights(built, tmp_path, capsys):
    """``homodistil evaluate`` reads exported models, not checkpoints: one whose weights were swapped
    for a pickled ``pytorch_model.bin`` is refused before transformers would open it."""
    model = tmp_path / "exported"
    assert main(["export", str(built), str(model)]) == 0
    (model / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save(Payload(marker), model / "pytorch_model.bin")
    capsys.readouterr()
    code = main(["evaluate", str(model), "--quick", "--tasks", "rt-polarity", "--out", str(tmp_path / "eval")])
    assert code == 2 and one_error_line(capsys.readouterr().err) == (
        f"homodistil: error: model 'exported': {model} holds no *.safetensors weights (pickled weights such as "
        "pytorch_model.bin are not opened: re-save with save_pretrained(safe_serialization=True))")
    assert not marker.exists()


def test_latest_naming_a_directory_outside_the_checkpoints_is_ignored(run, tmp_path, capsys):
    """``checkpoints/../../victim`` is ``tmp_path/victim``: complete, and failing its manifest, so a
    resume that followed ``latest`` there would rename it aside as damaged."""
    root = run / "checkpoints"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / checkpoint.COMPLETE).write_text("")
    (victim / checkpoint.MANIFEST).write_text(json.dumps({"files": {"gone.pt": {"bytes": 1, "crc32": 0}}}))
    (root / checkpoint.LATEST).write_text("../../victim")
    capsys.readouterr()
    assert distill(run) == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "ignored" in line] == [
        f"ignored {root / checkpoint.LATEST}: it holds '../../victim', not a checkpoint tag (stepNNNNNNNN)"], printed
    assert f"resumed from step 2 ({TAG})" in printed
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run", "victim"]
    assert sorted(p.name for p in victim.iterdir()) == [checkpoint.COMPLETE, checkpoint.MANIFEST]


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "..\\..\\x"])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_damage_and_never_opened(run, capsys, name):
    """Resolved against the checkpoint, ``/etc/passwd`` is the real file: a check that opened it would
    print its size ("N bytes, the manifest says 1")."""
    root = run / "checkpoints"
    manifest = root / TAG / checkpoint.MANIFEST
    files = json.loads(manifest.read_text())
    files["files"][name] = {"bytes": 1, "crc32": 0}
    manifest.write_text(json.dumps(files))
    capsys.readouterr()
    assert distill(run) == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "damaged" in line] == [
        f"damaged checkpoint {manifest}: names {name!r}, not a file of this checkpoint: renamed {root / TAG} to "
        f"{root / (TAG + '.damaged')}; falling back to the start (no earlier complete checkpoint)"], printed
    assert "bytes, the manifest says" not in printed and f"{Path('/etc/passwd').stat().st_size} bytes" not in printed
    assert checkpoint.complete_tags(root) == [TAG]  # the run started over and saved a new one


def test_checkpoints_and_the_token_cache_are_owner_only(built):
    dirs = [built / "checkpoints", built / "checkpoints" / TAG, built / "cache"]
    assert {d.name: oct(stat.S_IMODE(d.stat().st_mode)) for d in dirs} == {d.name: "0o700" for d in dirs}
