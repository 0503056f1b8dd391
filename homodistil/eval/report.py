"""Evaluate exported models side by side and write a markdown table + JSON.

Entry points: :func:`evaluate_main` (what ``homodistil evaluate`` calls) and
:func:`evaluate_models` (the same with explicit settings). Reads exported Hugging Face model
directories only; imports neither the engine nor pruning (DESIGN §6).

Output files in ``out_dir``: ``eval_results.json`` (rewritten after every step, so a long run
that stops leaves what it finished) and ``eval_results.md``.

JSON layout::

    {"format": 1, "created": ISO time, "teacher": NAME | null,
     "settings": {...every knob used...},
     "tasks": {TASK: {"kind", "metrics", "description", "origin", "notes", "train_examples",
                      "eval_examples": {SPLIT: n}}},
     "models": {NAME: {"path", "params": {"total", "embedding", "non_embedding"},
                       "latency": {"median_ms", ...} | null,
                       "extra": {KEY: float},                   # extra_metrics hook
                       "tasks": {TASK: {"finetune": {"metrics": {SPLIT: {METRIC: value}},
                                                     "main": 0-100, "history": [...], ...}
                                                    | {"error": str} | null,
                                        "probe": {... same ...} | null}}}},
     "markdown": PATH}
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from homodistil.data.corpora import DataError
from homodistil.eval.finetune import FinetuneConfig, finetune
from homodistil.eval.probe import Encoder, ProbeConfig, count_parameters, linear_probe, measure_latency
from homodistil.eval.tasks import TASKS, TaskData, load_task, parse_task, resolve_tasks

log = logging.getLogger("homodistil.eval")

ExtraMetrics = Callable[[str, str], Mapping[str, float]] | Mapping[str, Mapping[str, float]]


@dataclass
class EvalSettings:
    """Every knob of an evaluation run. ``quick()`` and ``full()`` are the two presets."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    max_train: int | None = None        # cap per task (seeded subset); None = all
    max_eval: int | None = None
    qa_max_train: int | None = None     # caps for SQuAD (None = max_train / max_eval)
    qa_max_eval: int | None = None
    split_seed: int = 0                 # offline tasks' train/validation split, and the caps
    do_finetune: bool = True
    do_probe: bool = True
    do_latency: bool = True
    latency_batch_size: int = 32
    latency_seq_len: int = 128
    latency_repeats: int = 10
    latency_threads: int | None = None  # None = torch's default

    @classmethod
    def full(cls, **overrides) -> EvalSettings:
        """Whole splits, 3 epochs, max length 128 (SQuAD 384, stride 128), latency median of 10."""
        return cls().override(**overrides)

    @classmethod
    def quick(cls, **overrides) -> EvalSettings:
        """A CPU-minutes run: 2000 train / 500 eval examples per task (SQuAD 500 / 200),
        1 epoch, max length 64 (SQuAD 256, stride 64), latency median of 5."""
        s = cls(max_train=2000, max_eval=500, qa_max_train=500, qa_max_eval=200, latency_repeats=5)
        s.finetune.epochs, s.finetune.max_length = 1, 64
        s.finetune.qa_max_length, s.finetune.doc_stride = 256, 64
        s.probe.max_length = 64
        return s.override(**overrides)

    @classmethod
    def from_config(cls, e, **overrides) -> EvalSettings:
        """The quick preset with a run config's ``evaluate`` section (``config.EvaluateConfig``:
        caps, epochs, lr, max length for fine-tuning and probe; a null knob keeps the preset's) and
        ``overrides`` on top."""
        return cls.quick(max_train=e.max_train or 0, max_eval=e.max_eval or 0, epochs=e.epochs, lr=e.lr,  # 0: whole
                         max_length=e.max_length, probe_max_length=e.max_length, **overrides)

    def override(self, **kw) -> EvalSettings:
        """Set knobs by name: a field of this class, of :class:`FinetuneConfig` (``epochs``,
        ``lr``, ``batch_size``, ``max_length`` ...) or of :class:`ProbeConfig` with a
        ``probe_`` prefix (``probe_C``, ``probe_max_length`` ...). ``seed``, ``device`` and
        ``progress`` go to both. ``None`` values are ignored; ``max_train=0`` lifts a cap."""
        own = {f.name for f in fields(self)} - {"finetune", "probe"}
        ft = {f.name for f in fields(FinetuneConfig)}
        pr = {f.name for f in fields(ProbeConfig)}
        for key, value in kw.items():
            if value is None:           # "not given" (so a CLI can pass its defaults through)
                continue
            if key in own:
                setattr(self, key, value)
            elif key in ("seed", "device", "progress"):
                setattr(self.finetune, key, value)
                setattr(self.probe, key, value)
            elif key in ft:
                setattr(self.finetune, key, value)
            elif key.startswith("probe_") and key[6:] in pr:
                setattr(self.probe, key[6:], value)
            else:
                raise TypeError(f"unknown evaluation setting '{key}'")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def _clean(obj):
    """JSON-safe copy: numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write(results: dict, out_dir: Path) -> None:
    tmp = out_dir / "eval_results.json.tmp"
    tmp.write_text(json.dumps(_clean(results), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "eval_results.json")


def _load_tasks(specs: Sequence[str], settings: EvalSettings,
                data_dirs: Mapping[str, str] | None) -> dict[str, TaskData]:
    out = {}
    for spec in specs:
        name, path = parse_task(spec)
        qa = TASKS[name].kind == "qa"
        max_train = settings.qa_max_train if qa and settings.qa_max_train else settings.max_train
        max_eval = settings.qa_max_eval if qa and settings.qa_max_eval else settings.max_eval
        out[name] = load_task(name, (data_dirs or {}).get(name) or path, max_train=max_train,
                              max_eval=max_eval, split_seed=settings.split_seed)
        log.info("task %s: %d train, %s (%s)", name, len(out[name].train),
                 {k: len(v) for k, v in out[name].evals.items()}, out[name].origin)
    return out


def _check_model_dir(name: str, path: str) -> None:
    """A model directory holds a config and safetensors weights: without them, ``from_pretrained``
    would unpickle ``pytorch_model.bin`` (refused by its ``weights_only`` check, as a traceback)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise DataError(f"model '{name}': {path} is not an exported model directory (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise DataError(f"model '{name}': {path} holds no *.safetensors weights (pickled weights such as "
                        f"pytorch_model.bin are not opened: re-save with save_pretrained(safe_serialization=True))")


def evaluate_models(model_dirs: Mapping[str, str], tasks: Sequence[str] | None, out_dir: str | Path, *,
                    teacher: str | None = None, settings: EvalSettings | None = None, quick: bool = False,
                    data_dirs: Mapping[str, str] | None = None,
                    extra_metrics: ExtraMetrics | None = None) -> dict:
    """Evaluate every model on every task; write ``eval_results.json`` / ``.md`` in ``out_dir``.

    model_dirs: display name -> exported HF model directory (config, weights, tokenizer).
    tasks: task specs (``"rt-polarity"``, ``"sst2=/data/sst2"``, groups ``offline``/``glue``);
        ``None`` = the offline tasks whose data is installed.
    teacher: the name (a key of ``model_dirs``) of the reference model; it is listed first and
        the other rows show their difference to it.
    settings: all knobs (default: ``EvalSettings.quick()`` if ``quick`` else ``.full()``).
    data_dirs: task name -> local data directory (same as ``"NAME=DIR"`` in ``tasks``).
    extra_metrics: the hook for measurements made elsewhere (e.g. held-out MLM loss or the
        teacher-student KL): either ``fn(name, model_dir) -> {column: float}`` called once per
        model, or a ready ``{name: {column: float}}``. Values go to ``models[name]["extra"]``
        and become extra markdown columns.
    Returns the results dict (the JSON's content).
    """
    if not model_dirs:
        raise ValueError("no models to evaluate")
    if teacher is not None and teacher not in model_dirs:
        raise ValueError(f"teacher '{teacher}' is not one of the models ({', '.join(model_dirs)})")
    for name, path in model_dirs.items():
        _check_model_dir(name, path)
    settings = settings or (EvalSettings.quick() if quick else EvalSettings.full())
    specs = resolve_tasks(tasks, only_available=tasks is None)
    if not specs:
        raise DataError("no task to run (the offline tasks' data is missing: see "
                        "homodistil.data.corpora.check_sources())")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_data = _load_tasks(specs, settings, data_dirs)
    order = ([teacher] if teacher else []) + [n for n in model_dirs if n != teacher]
    results: dict = {
        "format": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": teacher,
        "settings": settings.to_dict(),
        "tasks": {n: {"kind": t.spec.kind, "metrics": list(t.spec.metrics), "description": t.spec.description,
                      "origin": t.origin, "notes": t.notes, "train_examples": len(t.train),
                      "eval_examples": {k: len(v) for k, v in t.evals.items()}}
                  for n, t in task_data.items()},
        "models": {},
        "markdown": str(out_dir / "eval_results.md"),
    }
    for name in order:
        path = str(model_dirs[name])
        entry: dict = {"path": path, "params": None, "latency": None, "extra": {}, "tasks": {}}
        results["models"][name] = entry
        log.info("model %s (%s)", name, path)
        enc = Encoder(path, settings.probe.device)
        entry["params"] = count_parameters(enc.model)
        if settings.do_latency:
            entry["latency"] = measure_latency(enc.model, settings.latency_batch_size, settings.latency_seq_len,
                                               settings.latency_repeats, threads=settings.latency_threads,
                                               device=settings.probe.device)
        if extra_metrics is not None:
            extra = extra_metrics(name, path) if callable(extra_metrics) else extra_metrics.get(name, {})
            entry["extra"] = {str(k): float(v) for k, v in (extra or {}).items()}
        _write(results, out_dir)
        for tname, tdata in task_data.items():
            row = entry["tasks"][tname] = {"finetune": None, "probe": None}
            if settings.do_probe and tdata.spec.kind != "qa":
                try:
                    row["probe"] = linear_probe(enc, tdata, settings.probe)
                except (ValueError, RuntimeError) as err:
                    log.warning("probe %s/%s failed: %s", name, tname, err)
                    row["probe"] = {"error": f"{type(err).__name__}: {err}"}
                _write(results, out_dir)
        del enc
        gc.collect()
        if settings.do_finetune:
            for tname, tdata in task_data.items():
                row = entry["tasks"][tname]
                try:
                    row["finetune"] = finetune(path, tdata, settings.finetune)
                except (ValueError, RuntimeError, FloatingPointError) as err:
                    log.warning("fine-tuning %s/%s failed: %s", name, tname, err)
                    row["finetune"] = {"error": f"{type(err).__name__}: {err}"}
                gc.collect()
                _write(results, out_dir)
    (out_dir / "eval_results.md").write_text(render_markdown(results), encoding="utf-8")
    _write(results, out_dir)
    return _clean(results)


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------

def _fmt(x, digits=1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _main_cell(res: dict | None, splits: Sequence[str], teacher_res: dict | None) -> str:
    if res is None:
        return "–"
    if "error" in res:
        return "error"
    from homodistil.eval.metrics import main_score
    scores = [main_score(res["metrics"][s]) for s in splits if s in res["metrics"]]
    cell = "/".join(_fmt(s) for s in scores)
    if teacher_res and "error" not in teacher_res and teacher_res is not res:
        delta = res["main"] - teacher_res["main"]
        cell += f" ({delta:+.1f})"
    return cell


def _metric_label(task: dict) -> str:
    short = {"accuracy": "acc", "f1": "F1", "f1_macro": "macro-F1", "matthews": "MCC", "pearson": "P",
             "spearman": "S", "squad_v1": "F1", "squad_v2": "F1"}
    return "/".join(short.get(m, m) for m in task["metrics"])


def render_markdown(results: dict) -> str:
    """The results as a markdown table: one row per model (teacher first), params, latency,
    extra columns, then fine-tuned and probe scores per task (0-100; the mean of the task's
    metrics, MNLI as matched/mismatched; students show their difference to the teacher)."""
    teacher = results.get("teacher")
    models = results["models"]
    tasks = results["tasks"]
    t_entry = models.get(teacher) if teacher else None
    extra_cols = sorted({k for m in models.values() for k in (m.get("extra") or {})})
    head = ["model", "params (M)", "non-emb (M)"]
    lat = next((m["latency"] for m in models.values() if m.get("latency")), None)
    if lat:
        head.append(f"latency ms (bs {lat['batch_size']}×{lat['seq_len']})")
    head += extra_cols
    for tname, t in tasks.items():
        head.append(f"{tname} ft ({_metric_label(t)})")
        if t["kind"] != "qa":
            head.append(f"{tname} probe")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        params = m.get("params") or {}
        cells = [f"**{name}** (teacher)" if name == teacher else name]
        total = params.get("total")
        cell = _fmt(total / 1e6 if total else None, 2)
        if t_entry and name != teacher and total and t_entry["params"]:
            cell += f" ({100 * total / t_entry['params']['total']:.0f}%)"
        cells.append(cell)
        cells.append(_fmt(params["non_embedding"] / 1e6 if params else None, 2))
        if lat:
            ms = (m.get("latency") or {}).get("median_ms")
            cell = _fmt(ms, 1)
            if t_entry and name != teacher and ms and (t_entry.get("latency") or {}).get("median_ms"):
                cell += f" ({t_entry['latency']['median_ms'] / ms:.1f}×)"
            cells.append(cell)
        for col in extra_cols:
            cells.append(_fmt((m.get("extra") or {}).get(col), 4))
        for tname, t in tasks.items():
            row = m["tasks"].get(tname) or {}
            trow = (t_entry["tasks"].get(tname) or {}) if t_entry else {}
            splits = list(t["eval_examples"])
            cells.append(_main_cell(row.get("finetune"), splits, trow.get("finetune")))
            if t["kind"] != "qa":
                cells.append(_main_cell(row.get("probe"), splits, trow.get("probe")))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- **{n}**: {t['description']}; {t['train_examples']} train / "
             + ", ".join(f"{v} {k}" for k, v in t["eval_examples"].items())
             + f" examples; {t['origin']}" + "".join(f"; {x}" for x in t["notes"]) for n, t in tasks.items()]
    s = results.get("settings", {})
    ft = s.get("finetune", {})
    notes.append(f"- fine-tuning: {ft.get('epochs')} epoch(s), lr {ft.get('lr')}, batch {ft.get('batch_size')}, "
                 f"max length {ft.get('max_length')}, seed {ft.get('seed')}; scores after the last epoch. "
                 "Probe: frozen mean-pooled embeddings, standardised logistic / ridge regression.")
    return "\n".join(["# Evaluation", "", *lines, "", *notes, ""])


# --------------------------------------------------------------------------------------------
# the CLI's entry point
# --------------------------------------------------------------------------------------------

def _names_for(paths: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in paths:
        base = Path(p).resolve().name or "model"
        name, i = base, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out[name] = str(p)
    return out


def evaluate_main(model_dirs: str | Sequence[str] | Mapping[str, str], tasks: Sequence[str] | str | None = None,
                  out_dir: str | Path = "runs/eval", quick: bool = False, *, teacher: str | None = None,
                  data_dirs: Mapping[str, str] | None = None, extra_metrics: ExtraMetrics | None = None,
                  print_table: bool = True, settings: EvalSettings | None = None, **overrides) -> dict:
    """``homodistil evaluate MODEL_DIR [--teacher DIR] [--tasks ...] [--quick]``.

    model_dirs: one exported model directory (named ``student``), a list of them (named by
        their directory names), or a dict name -> directory.
    tasks: task specs, a list or a comma/space-separated string: names (``rt-polarity``,
        ``rt-score``, ``tweets-3class``, ``cola`` ... ``rte``, ``squad``, ``squad_v2``),
        ``NAME=DIR`` for local data, groups ``offline`` / ``glue``. ``None``: the offline tasks
        whose data is installed.
    out_dir: where ``eval_results.json`` and ``eval_results.md`` go (created).
    quick: ``EvalSettings.quick()`` (capped data, 1 epoch; minutes on a CPU) instead of
        ``EvalSettings.full()``.
    teacher: an exported teacher directory, evaluated too, listed first (named ``teacher``);
        the other rows show differences to it.
    data_dirs, extra_metrics: see :func:`evaluate_models` (``extra_metrics`` is the hook for
        held-out MLM loss / KL computed by the engine side).
    settings: every knob at once (e.g. :meth:`EvalSettings.from_config`); else ``quick`` and
        ``overrides`` choose them.
    overrides: any :meth:`EvalSettings.override` knob, e.g. ``epochs=2``, ``lr=3e-5``,
        ``max_train=500``, ``do_finetune=False``, ``latency_batch_size=8``, ``seed=1``.
    Returns the results dict; prints the markdown table unless ``print_table=False``.
    """
    if isinstance(model_dirs, (str, os.PathLike)):
        named = {"student": str(model_dirs)}
    elif isinstance(model_dirs, Mapping):
        named = {str(k): str(v) for k, v in model_dirs.items()}
    else:
        named = _names_for([str(p) for p in model_dirs])
    teacher_name = None
    if teacher is not None:
        teacher_name = "teacher"
        if teacher_name in named:
            raise ValueError("a model is already named 'teacher'")
        named = {teacher_name: str(teacher), **named}
    settings = settings or (EvalSettings.quick if quick else EvalSettings.full)(**overrides)
    results = evaluate_models(named, tasks, out_dir, teacher=teacher_name, settings=settings,
                              data_dirs=data_dirs, extra_metrics=extra_metrics)
    if print_table:
        print(Path(results["markdown"]).read_text(encoding="utf-8"))
    return results
