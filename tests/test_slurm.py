"""The shipped sbatch scripts, run for real on a throw-away local Slurm cluster.

The cluster (tests/slurm_cluster.py) has two simulated nodes on this host. Each test submits
``slurm/homobert_base.sh`` itself — not a copy — from the repository root, shrinking it to a
CPU-sized run with sbatch options (no GPUs, 2 tasks) and trailing ``key=value`` overrides (the
tiny random teacher, a small local text file, a few steps). Needs root; skips (saying why)
only where Slurm cannot be installed. Takes ~2-3 minutes.

Install line (also run by the fixture when Slurm is missing):
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_slurm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["homobert_base", "homobert_small", "homobert_xsmall", "homobert_tiny", "llama3_8b_to_4b"]
NODES = {"llama3_8b_to_4b": 4}  # the others: one node

# sbatch options that turn the 8-GPU A100 request into 2 CPU tasks on this machine.
CPU_SBATCH = ["--gres=none", "--cpus-per-task=1", "--time=00:30:00"]


def tiny_overrides(corpus: Path, steps: int, **extra) -> list[str]:
    """The recipe shrunk to seconds: tiny random BERT teacher, local text, fp32, ZeRO-0."""
    values = {
        "model.teacher": "tiny", "data.source": str(corpus), "data.streaming": "false",
        "data.max_seq_length": 32, "trainer.max_steps": steps, "trainer.save_every": 2,
        "trainer.log_every": 1, "trainer.export": "false",
        "deepspeed.zero_optimization.stage": 0, "deepspeed.bf16.enabled": "false",
        "deepspeed.train_micro_batch_size_per_gpu": 2, "deepspeed.gradient_accumulation_steps": 1,
        "pruning.t_i": 0, "pruning.t_f": 4, "pruning.mask_interval": 1, "pruning.shrink_interval": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_slurm()
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")
    # HOMODISTIL_TEST_SLURM_ROOT=/some/dir keeps the cluster's logs and state there for debugging
    c = SlurmCluster(nodes=2, root=os.environ.get("HOMODISTIL_TEST_SLURM_ROOT") or None)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        c.cleanup()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at "
             "which but have an they you were her she there").split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "."
                                for _ in range(300)))
    return path


def job_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def read_log(path: Path) -> str:
    assert path.exists(), f"no job output at {path}"
    return path.read_text(errors="replace")


def assert_checkpoint(run_dir: Path, step: int, world: int) -> None:
    ckpt = run_dir / "checkpoints"
    tag = f"step{step:08d}"
    assert (ckpt / "latest").read_text().strip() == tag, f"latest is not {tag}: {sorted(os.listdir(ckpt))}"
    assert (ckpt / tag / "COMPLETE").exists()
    for rank in range(world):  # every rank wrote its RNG state: every rank reached this step
        assert (ckpt / tag / f"rank{rank}.pt").exists(), f"rank {rank} did not save at step {step}"


# ---------------------------------------------------------------------------------------------
# Static checks (no cluster, no root)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash_with_its_config(name):
    script = REPO / "slurm" / f"{name}.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert f"CONFIG=configs/{name}.yaml" in text
    assert f"#SBATCH --job-name={name}" in text
    for option in ("--requeue", "--signal=B:USR1@", "--gres=gpu:8", "--ntasks-per-node=8",
                   f"--nodes={NODES.get(name, 1)}"):
        assert f"#SBATCH {option}" in text
    assert text.rstrip().endswith('source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" "$@"')  # overrides passed on
    assert not re.search(r"\$\{?[1-9]", text), "positional $1..$9: use named key=value overrides"
    config = (REPO / "configs" / f"{name}.yaml").read_text().splitlines()
    assert config[0] == f"# sbatch slurm/{name}.sh" or config[0].startswith(f"# sbatch slurm/{name}.sh ")


def test_shared_launch_has_one_srun_with_the_overrides():
    text = (REPO / "slurm" / "launch.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "launch.sh")], capture_output=True).returncode == 0
    launches = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
    assert len(launches) == 1 and '"$@"' in launches[0] and 'distill "$CONFIG"' in launches[0]
    assert not re.search(r"\$\{?[1-9]", text), "positional $1..$9: use named key=value overrides"


def test_script_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/homobert_base.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "sbatch" in proc.stderr


def _launch_with_stubs(tmp_path: Path, job_name: str, job_id: int = 4242) -> subprocess.CompletedProcess:
    """slurm/launch.sh as a batch job would source it, with scontrol/srun stubs on PATH: srun
    prints the rendezvous it was given instead of starting tasks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "rendezvous $MASTER_ADDR:$MASTER_PORT"\n')
    for stub in ("scontrol", "srun"):
        (bin_dir / stub).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", CONFIG="configs/tiny.yaml", SLURM_JOB_ID=str(job_id),
               SLURM_JOB_NAME=job_name, SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="localhost",
               SLURM_NTASKS="1", HOMODISTIL_CMD="true")
    return subprocess.run(["bash", "slurm/launch.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", "x..y", "name with space", ""])
def test_launch_refuses_a_job_name_that_is_not_a_plain_file_name(tmp_path, name):
    proc = _launch_with_stubs(tmp_path, name)
    assert proc.returncode == 2 and "rendezvous" not in proc.stdout
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("homodistil: error: job name"), err


def test_launch_rendezvous_port_is_free_and_not_derived_from_the_job_id(tmp_path):
    """The port is the kernel's choice on the first node, not 20000 + job id mod 20000."""
    ports = set()
    for _ in range(2):
        proc = _launch_with_stubs(tmp_path, "pytest-ok.name_1", job_id=4242)
        assert proc.returncode == 0, proc.stderr
        address = next(line for line in proc.stdout.splitlines() if line.startswith("rendezvous ")).split()[1]
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and 1024 <= int(port) < 65536
        ports.add(int(port))
    assert 20000 + 4242 % 20000 not in ports


# ---------------------------------------------------------------------------------------------
# Real jobs
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_base_script_trains_on_two_ranks_and_resubmission_resumes(cluster, corpus, tmp_path):
    """Default output dir is runs/<job name>: a second submission with the same name resumes."""
    name = f"pytest-homobert-{os.getpid()}"
    run_dir = REPO / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    env = job_env(HOMODISTIL_PYTHON=sys.executable)
    opts = [*CPU_SBATCH, "--nodes=1", "--ntasks-per-node=2", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out"]
    try:
        job = cluster.sbatch([*opts, "slurm/homobert_base.sh", *tiny_overrides(corpus, 4)],
                             cwd=REPO, env=env, timeout=600)
        assert job.returncode == 0 and job.id, job
        log = read_log(tmp_path / f"{name}-{job.id}.out")
        assert "world size 2" in log, log[-3000:]
        assert re.search(r"^0: step 4/4 ", log, re.M), log[-3000:]
        assert re.search(r"^1: ", log, re.M), "no output from task 1"
        assert "error" not in log.lower(), log[-3000:]
        assert_checkpoint(run_dir, 4, world=2)
        assert (run_dir / "checkpoints" / "step00000002" / "COMPLETE").exists()

        job2 = cluster.sbatch([*opts, "slurm/homobert_base.sh", *tiny_overrides(corpus, 6)],
                              cwd=REPO, env=env, timeout=600)
        assert job2.returncode == 0 and job2.id != job.id, job2
        log2 = read_log(tmp_path / f"{name}-{job2.id}.out")
        assert "resumed from step 4" in log2, log2[-3000:]
        assert re.search(r"^0: step 6/6 ", log2, re.M), log2[-3000:]
        assert not re.search(r"^0: step [1-4]/6 ", log2, re.M), "steps 1-4 ran again"
        assert_checkpoint(run_dir, 6, world=2)
        print(f"\nslurm jobs: {job.seconds:.0f} s (4 steps), {job2.seconds:.0f} s (resume to 6)")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.timeout(900)
def test_time_limit_signal_saves_requeues_and_resumes(cluster, corpus, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@300 sends) -> save, requeue, resume, finish."""
    out = tmp_path / "run"  # an explicit trainer.output_dir after the script's default wins
    env = job_env(HOMODISTIL_CMD=f"{sys.executable} -m homodistil.cli")
    steps = 40
    t0 = time.monotonic()
    job_id = cluster.submit([*CPU_SBATCH, "--nodes=1", "--ntasks-per-node=2", "--job-name=pytest-requeue",
                             f"--output={tmp_path}/%x-%j.out", "slurm/homobert_base.sh",
                             *tiny_overrides(corpus, steps, **{"trainer.save_every": 1000,
                                                               "trainer.output_dir": out})],
                            cwd=REPO, env=env)
    log_path = tmp_path / f"pytest-requeue-{job_id}.out"
    try:
        while not (log_path.exists() and re.search(rf"^0: step 3/{steps} ", log_path.read_text(), re.M)):
            assert time.monotonic() - t0 < 300, f"no step 3 after 300 s: {cluster.job_state(job_id)}"
            assert cluster.job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), read_log(log_path)[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=cluster.env(), check=True)
        seen, state = [], None
        while state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"):
            assert time.monotonic() - t0 < 600, f"job {job_id} still {state}: {seen}"
            state = cluster.job_state(job_id)
            if not seen or seen[-1] != state:
                seen.append(state)
                if state == "PENDING" and "RUNNING" in seen:
                    # Slurm holds a requeued job for ~2 min before it may start again. Shorten that,
                    # but not to "now": a relaunch within the second of the requeue finds the job's
                    # credential revoked ("Killing non-startable batch job") and the job FAILS.
                    cluster.wait_idle()
                    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now+2")
            time.sleep(0.3)
        log = read_log(log_path)
        assert state == "COMPLETED", f"{seen}\n{log[-3000:]}"
        assert "RUNNING" in seen and "PENDING" in seen[seen.index("RUNNING"):], seen
        saved = re.search(r"SIGTERM: saving at step (\d+)", log)
        assert saved, log[-3000:]
        assert "(restart 1)" in log
        assert f"resumed from step {saved.group(1)}" in log, log[-3000:]
        assert re.search(rf"^0: step {steps}/{steps} ", log, re.M), log[-3000:]
        assert_checkpoint(out, steps, world=2)
        print(f"\nslurm requeue: saved at step {saved.group(1)}, finished after {time.monotonic() - t0:.0f} s")
    finally:
        subprocess.run(["scancel", job_id], env=cluster.env(), capture_output=True)


@pytest.mark.timeout(600)
def test_base_script_on_two_nodes(cluster, corpus, tmp_path):
    """Two slurmd on this host, one task each: MASTER_ADDR is the first node, ranks meet there."""
    n1, n2 = cluster.node_names
    out = tmp_path / "run"
    job = cluster.sbatch([*CPU_SBATCH, "--nodes=2", "--ntasks-per-node=1", "--job-name=pytest-2nodes",
                          f"--output={tmp_path}/%x-%j.out", "slurm/homobert_base.sh",
                          *tiny_overrides(corpus, 4, **{"trainer.output_dir": out})],
                         cwd=REPO, env=job_env(HOMODISTIL_PYTHON=sys.executable), timeout=500)
    assert job.returncode == 0 and job.id, job
    log = read_log(tmp_path / f"pytest-2nodes-{job.id}.out")
    assert re.search(rf"on {re.escape(cluster.name)}n\[1-2\]: 2 tasks, master {n1}:\d+", log), log[:2000]
    assert "world size 2" in log and re.search(r"^0: step 4/4 ", log, re.M), log[-3000:]
    assert_checkpoint(out, 4, world=2)
    # slurmd of the second node launched a task of this job
    node2_log = (cluster.root / "log" / f"slurmd-{n2}.log").read_text()
    assert re.search(rf"launch task (StepId=)?{job.id}\.0", node2_log), node2_log[-2000:]
    print(f"\nslurm two nodes: {job.seconds:.0f} s")
