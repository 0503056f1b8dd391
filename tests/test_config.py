"""Every shipped config validates; wrong configs give one-line errors naming key and file."""
from pathlib import Path

import pytest

from homodistil.cli import main
from homodistil.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid_and_says_how_to_run(path):
    cfg = load_config(path)
    assert cfg.trainer.max_steps >= cfg.pruning.t_f
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("homodistil" in first or "sbatch" in first), first


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["trainer.max_steps=300", "pruning.sparsity.ffn=0.25", "deepspeed.zero_optimization.stage=3",
                       "optimizer.betas=[0.9, 0.98]", "data.source=[kjv, /tmp/x.txt]"])
    assert cfg.trainer.max_steps == 300 and cfg.pruning.sparsity.ffn == 0.25
    assert cfg.zero_stage == 3 and cfg.optimizer.betas == (0.9, 0.98) and cfg.data.source == ["kjv", "/tmp/x.txt"]
    assert cfg.trainer.keep_checkpoints == 2  # the default
    assert load_config(REPO / "configs" / "tiny.yaml", ["trainer.keep_checkpoints=5"]).trainer.keep_checkpoints == 5


def _write(tmp_path, text: str | bytes):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


BAD = [  # (config text or None for tiny.yaml, overrides, expected fragment of the one-line error)
    ("trainer: {max_step: 5}", [], "trainer.max_step: unknown key"),
    ("trainer: {max_steps: many}", [], "trainer.max_steps: Input should be a valid integer"),
    (None, ["pruning.t_i=50", "pruning.t_f=40"], "pruning.t_f (40) must be greater than pruning.t_i (50)"),
    (None, ["pruning.sparsity.ffn=1.0"], "pruning.sparsity.ffn: Input should be less than 1"),
    (None, ["model.attn_implementation=sdpa", "loss.alpha_attention=1"], "loss.alpha_attention > 0 needs model.attn_implementation=eager"),
    (None, ["pruning.t_f=500"], "is after trainer.max_steps"),
    (None, ["deepspeed.optimizer={type: Adam}"], "deepspeed.optimizer is not supported"),
    (None, ["deepspeed.zero_optimization.stage=4"], "stage must be 0, 1, 2 or 3"),
    (None, ["deepspeed.fp16.enabled=true"], "deepspeed.fp16 is not supported"),
    (None, ["deepspeed.bf16.enabled=true"], "deepspeed.bf16 at ZeRO stage 0 is not supported"),
    (None, ["trainer.max_steps"], "is not of the form section.key=value"),
    (None, ["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints: Input should be greater than or equal to 1"),
    (None, ["model.init=scratch", "pruning.schedule=oneshot"], "pruning.schedule does not apply"),
    (None, ["model.init=random"], "model.init: Input should be 'teacher' or 'scratch'"),
    (None, ["evaluate.finetune_tasks=[sst2]"], "evaluate.finetune_tasks ['sst2'] are not in evaluate.tasks"),
    (None, ["trainer.perf_every=-1"], "trainer.perf_every: Input should be greater than or equal to 0"),
    (None, ["trainer.peak_tflops=-1"], "trainer.peak_tflops: Input should be greater than 0"),
    (None, ["trainer.profile={steps: 2}"], "trainer.profile.start: Field required"),
    (None, ["trainer.profile={start: 1, step: 2}"], "trainer.profile.step: unknown key"),
    (None, ["trainer.profile={start: 500}"], "trainer.profile.start (500) is after trainer.max_steps (200)"),
    (None, ["pruning.score_after=11"], "pruning.score_after (11) is after pruning.t_i (10)"),
    (None, ["pruning.platon_window=0"], "pruning.platon_window: Input should be greater than 0"),
    (None, ["pruning.width_multiple.ffn=0"], "pruning.width_multiple.ffn: Input should be greater than 0"),
    (None, ["pruning.width_multiple.attention=8"], "pruning.width_multiple.attention: unknown key"),
    (None, ["pruning.width_multiple=64"], "pruning.width_multiple: Input should be a valid dictionary"),
    (None, ["evaluate.max_train=0"], "evaluate.max_train: Input should be greater than 0"),
    ("- a\n- b", [], "the top level must be a mapping"),
    ("trainer: [", [], "is not valid YAML"),
    (b"trainer: {output_dir: caf\xe9}", [], "not UTF-8 text (byte 25)"),
    ("", [], "the config is empty"),
    ("# only a comment\n", [], "the config is empty"),
    (None, ["deepspeed.zero_optimization=3"], "deepspeed.zero_optimization must be a section, got 3"),
    (None, ["deepspeed.bf16=1"], "deepspeed.bf16 must be a section, got 1"),
    (None, ["optimizer.lr=.inf"], "optimizer.lr: Input should be a finite number"),
    (None, ["optimizer.lr=.nan"], "optimizer.lr: Input should be a finite number"),
    (None, ["optimizer.lr=0"], "optimizer.lr: Input should be greater than 0"),
    (None, ["model.revision=../main"], "model.revision: '../main' is not a commit hash"),
    (None, ["data.revision={wikipedia: main}"], "data.revision names ['wikipedia'], which are not hub:NAME sources"),
]


@pytest.mark.parametrize("text,overrides,expected", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_config_is_one_line_error(tmp_path, capsys, text, overrides, expected):
    path = _write(tmp_path, text) if text is not None else str(REPO / "configs" / "tiny.yaml")
    assert main(["distill", path, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("homodistil: error: ") and expected in err, err
    if text is not None:
        assert path in err  # names the file


def test_revisions_parse():
    """model.revision takes a commit or a tag; data.revision one per hub dataset of data.source."""
    sha = "86b5e0934494bd15c9632b12f734a8a67f723594"
    assert load_config(None).model.revision is None and load_config(None).data.revision == {}
    assert load_config(None, [f"model.revision={sha}"]).model.revision == sha
    assert load_config(None, ["model.revision=v1.0"]).model.revision == "v1.0"
    cfg = load_config(REPO / "configs" / "homobert_base.yaml", [f"data.revision={{wikimedia/wikipedia: {sha}}}"])
    assert cfg.data.revision == {"wikimedia/wikipedia": sha} and cfg.model.revision == sha  # the recipe pins it


def test_missing_config_file(capsys):
    assert main(["distill", "/no/such/config.yaml"]) == 2
    assert "config file not found: /no/such/config.yaml" in capsys.readouterr().err


def test_load_config_raises_config_error():
    with pytest.raises(ConfigError):
        load_config(None, ["loss.temperature=0"])


@pytest.mark.parametrize("overrides, expected", [
    ([], 1.0),  # eager attention, 128 tokens
    (["data.max_seq_length=2048"], 0.0),  # long sequences: T² maps per layer
    (["model.attn_implementation=sdpa"], 0.0),  # no maps without eager attention
    (["data.max_seq_length=2048", "loss.alpha_attention=0.5"], 0.5),  # an explicit value is kept
])
def test_attention_loss_default_depends_on_sequence_length(overrides, expected):
    cfg = load_config(None, overrides)
    assert cfg.loss.alpha_attention == expected
    assert load_config(None, overrides).model_dump()["loss"]["alpha_attention"] == expected


def test_perf_keys_parse():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["trainer.perf_every=5", "trainer.peak_tflops=989", "trainer.profile={start: 3}"])
    assert cfg.trainer.perf_every == 5 and cfg.trainer.peak_tflops == 989.0
    assert (cfg.trainer.profile.start, cfg.trainer.profile.steps) == (3, 3)
    defaults = load_config(None)
    assert defaults.trainer.perf_every == 50 and defaults.trainer.peak_tflops is None and defaults.trainer.profile is None


def test_study_keys_parse():
    """pruning.platon_window / score_after and evaluate caps of null (whole splits): defaults keep today's runs."""
    defaults = load_config(None)
    assert defaults.pruning.platon_window == 1 and defaults.pruning.score_after == 0
    assert (defaults.evaluate.max_train, defaults.evaluate.max_eval) == (1000, 500)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["pruning.platon_window=10", "pruning.score_after=10",
                                                       "evaluate.max_train=null", "evaluate.max_eval=null"])
    assert cfg.pruning.platon_window == 10 and cfg.pruning.score_after == 10
    assert cfg.evaluate.max_train is None and cfg.evaluate.max_eval is None
    from homodistil.eval.report import EvalSettings  # noqa: PLC0415
    whole = EvalSettings.from_config(cfg.evaluate)
    assert (whole.max_train, whole.max_eval) == (0, 0)  # 0: no cap (eval.tasks._cap)
    assert EvalSettings.from_config(defaults.evaluate).max_train == 1000


def test_demo_runs_the_budget_studys_schedule():
    """configs/demo.yaml is the study's (a) at T = max_steps: t_f = T/2, no mask update above 2% of a width."""
    from homodistil.apps.compare import budget_schedule  # noqa: PLC0415

    cfg = load_config(REPO / "configs" / "demo.yaml")
    p = cfg.pruning
    assert p.sparsity.ffn == p.sparsity.attention == p.sparsity.hidden
    want = budget_schedule(cfg.trainer.max_steps, 0.5, p.t_i, p.sparsity.ffn, 0.02)
    assert (p.t_f, p.mask_interval, p.shrink_interval) == (want["t_f"], want["mask_interval"], want["shrink_interval"])
    assert (p.t_f, p.mask_interval) == (150, 1)


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_missing_evaluation_data_stops_before_any_training(tmp_path, monkeypatch, capsys, command):
    """A missing download (VADER ratings, rt-polarity's data) is one line at start, not a failure after the run."""
    monkeypatch.setenv("HOMODISTIL_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("HOMODISTIL_VADER", raising=False)
    out = tmp_path / "run"
    tiny = str(REPO / "configs" / "tiny.yaml")
    argv = ({"demo": [tiny, f"trainer.output_dir={out}"],
             "compare": [tiny, "--sizes", "0.5", "--seeds", "0", "--out", str(out), "--page", str(tmp_path / "p.md")]}
            [command])
    assert main([command, *argv, "evaluate.tasks=[rt-polarity,tweets-3class]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("homodistil: error: evaluation data missing"), err
    assert f"rt-polarity: VADER ratings not found in {tmp_path / 'empty'}" in err and "tweets-3class" not in err
    assert not out.exists()


def test_model_revision_reaches_from_pretrained(monkeypatch, tmp_path):
    """model.revision is passed to every hub load of the teacher and its tokenizer; never to a local directory."""
    from homodistil.engine import models  # noqa: PLC0415

    calls = []

    def recorder(kind):
        def from_pretrained(name, **kwargs):
            calls.append((kind, name, kwargs.get("revision")))
            raise OSError("stop here")  # models turns it into its one-line ModelError
        return from_pretrained

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", recorder("config"))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    sha = "86b5e0934494bd15c9632b12f734a8a67f723594"
    cfg = load_config(None, ["model.teacher=bert-base-uncased", f"model.revision={sha}"]).model
    for load in (lambda: models.teacher_config("bert-base-uncased", cfg.revision), lambda: models.load_tokenizer(cfg)):
        with pytest.raises(models.ModelError):
            load()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelError):
        models.teacher_config(str(tmp_path), sha)
    assert calls == [("config", "bert-base-uncased", sha), ("tokenizer", "bert-base-uncased", sha),
                     ("config", str(tmp_path), None)]
