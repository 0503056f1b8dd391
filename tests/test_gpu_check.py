"""The prepared GPU check on a CPU machine: the script parses, says in one line that it needs a
GPU, and the configs and overrides its parts run load (the runs themselves need the GPU)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from homodistil.config import load_config
from homodistil.cost import make_plan, teacher_arch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "scripts/system-deps.sh",
                                    "scripts/tensorboard_screenshot.sh", "slurm/launch.sh"])
def test_scripts_use_no_fixed_names_in_tmp(script):
    """A fixed /tmp path can be planted by another user (gpu_check put /tmp/site first on PYTHONPATH):
    temporary files and directories come from mktemp."""
    text = (REPO / script).read_text()
    assert not re.search(r"/tmp/[A-Za-z0-9]", text), re.search(r"/tmp/\S*", text).group(0)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_script_says_it_needs_a_gpu(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "res")})
    assert done.returncode == 0
    assert done.stdout.strip().splitlines() == [
        "gpu_check: needs an NVIDIA GPU (no nvidia-smi or no device); nothing run"]
    assert not (tmp_path / "res").exists()


def script_overrides(part: str) -> list[str]:
    """The key=value overrides of one ``benchmarks/gpu_run.py`` call in the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if f"part {part} " in ln)
    return [w.strip('"') for w in line.split() if re.match(r"^\"?[a-z0-9_.]+=", w) and "$" not in w]


def test_demo_part_overrides_load_and_keep_the_demo_shape():
    cfg = load_config(REPO / "configs" / "demo.yaml", script_overrides("c_demo"))
    t = cfg.model.tiny
    assert cfg.model.teacher == "tiny" and (t.hidden_size, t.num_hidden_layers) == (384, 6)
    assert (t.num_attention_heads, t.intermediate_size) == (12, 1536)  # all-MiniLM-L6-v2's shape
    assert cfg.bf16 and cfg.zero_stage == 2 and cfg.trainer.max_steps == 200


def test_llama_smoke_config_is_llama_3_2_1b_shaped_and_planned_as_llama():
    cfg = load_config(REPO / "configs" / "gpu_smoke_llama1b.yaml")
    arch = teacher_arch(cfg)
    assert (arch.family, arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads,
            arch.intermediate_size) == ("llama", 2048, 16, 32, 8, 8192)
    assert not arch.tie_word_embeddings
    assert cfg.bf16 and cfg.zero_stage == 2 and cfg.data.max_seq_length == 2048
    assert cfg.pruning.sparsity.attention == 0 and min(cfg.pruning.shrink_interval, cfg.pruning.t_f) == 20
    assert make_plan(cfg, "h200", 1, 1).fits


def test_gpu_run_without_gpu_prints_one_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_run", REPO / "benchmarks" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)
    args = gpu_run.parse_args(["configs/demo.yaml", "a.b=1", "--out", "x", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.out == "x" and args.profile_steps == 3
    assert gpu_run.main(["configs/demo.yaml", "--out", "x"]) == 0
    assert capsys.readouterr().out.strip() == gpu_run.NO_GPU
    assert gpu_run.perf_means([{"step": 1, "perf/mfu": 0.2}, {"step": 2, "perf/mfu": 0.3}]) == {"perf/mfu": 0.25}


def test_gpu_run_measures_each_width_in_its_steady_state():
    """Part d's run has one shrink (step 20): the steady figures leave out warm-up (steps 1-2, 21-22) and the
    shrink's step, and MFU is the cost model's FLOPs per token at each segment's widths over the peak."""
    import importlib.util

    from homodistil.cost import run_schedule, step_flops_per_token

    spec = importlib.util.spec_from_file_location("gpu_run", REPO / "benchmarks" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)
    cfg = load_config(REPO / "configs" / "gpu_smoke_llama1b.yaml")
    slow = {1, 2, 20, 21, 22}  # warm-up and the shrink: 100 s each, which a steady figure must not see
    rows = [{"step": s, "time/step_s": 100.0 if s in slow else 0.5 if s < 20 else 0.25} for s in range(1, 41)]
    before, after = gpu_run.segments(cfg, rows, peak_tflops=989.0)
    tokens = 4 * 2048
    assert (before["steps"], before["measured"], before["hidden"], before["ffn"]) == ([1, 20], [3, 19], 2048, 8192)
    assert (after["steps"], after["measured"], after["hidden"], after["ffn"]) == ([21, 40], [23, 40], 1024, 4096)
    assert before["aligned"] and after["aligned"]
    assert before["tokens_per_s"] == pytest.approx(tokens / 0.5) and after["tokens_per_s"] == pytest.approx(tokens / 0.25)
    schedule, arch = run_schedule(cfg)
    full = step_flops_per_token(cfg, teacher_arch(cfg), arch(schedule.kept(0)))
    assert before["mfu"] == pytest.approx(tokens / 0.5 * full / 989e12, rel=1e-12)
    assert after["gflop_per_token"] < before["gflop_per_token"]
