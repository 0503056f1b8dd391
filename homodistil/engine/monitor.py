"""Progress bar, log lines, TensorBoard scalars and a metrics file, all on rank 0 only.

A run that resumes from step ``start`` first drops what a killed predecessor logged after
that step (rows of ``metrics.jsonl`` and ``heldout.jsonl``, TensorBoard events via ``purge_step``), so all hold one
record per step, as an uninterrupted run's would.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


def _truncate_metrics(path: Path, start: int) -> None:
    """Keep the rows of steps <= ``start`` (and drop a line cut short by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= start:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class Monitor:
    def __init__(self, out_dir: Path, rank: int, total: int, start: int, progress: bool):
        self.active = rank == 0
        self.bar = self.writer = self.metrics = None
        self.tokens_per_s = 0.0
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
        for name in ("metrics.jsonl", "heldout.jsonl"):
            _truncate_metrics(out_dir / name, start)
        self.metrics = (out_dir / "metrics.jsonl").open("a")
        self.heldout_file = (out_dir / "heldout.jsonl").open("a")
        self.bar = tqdm(total=total, initial=start, desc="distill", unit="step", dynamic_ncols=True,
                        disable=not progress)

    def step(self, step: int, scalars: dict[str, float], log_line: bool) -> None:
        if not self.active:
            return
        self.tokens_per_s = scalars.get("perf/tokens_per_s", self.tokens_per_s)  # written every perf_every steps
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics.flush()
        self.bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", kl=f"{scalars.get('loss/kl', 0.0):.3f}",
                             sparsity=f"{scalars['prune/sparsity']:.2f}",
                             params=f"{scalars['prune/live_params'] / 1e6:.2f}M", refresh=False,
                             **({"tok/s": f"{self.tokens_per_s:.0f}"} if self.tokens_per_s else {}))
        self.bar.update(step - self.bar.n)
        if log_line:
            terms = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in scalars.items() if k.startswith("loss/"))
            self.bar.write(f"step {step}/{self.bar.total} {terms} sparsity={scalars['prune/sparsity']:.3f} "
                           f"live_params={int(scalars['prune/live_params'])} step_time={scalars['time/step_s']:.3f}s"
                           + (f" tokens/s={self.tokens_per_s:.0f}" if self.tokens_per_s else ""))  # none before perf_every

    def heldout(self, step: int, values: dict[str, float]) -> None:
        """Held-out figures at ``step`` (``trainer.eval_every``): TensorBoard ``heldout/*`` and heldout.jsonl."""
        if not self.active:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"heldout/{key}", value, step)
        self.heldout_file.write(json.dumps({"step": step, **values}) + "\n")
        self.heldout_file.flush()

    def note(self, message: str) -> None:
        if self.active:
            self.bar.write(message)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()
            self.metrics.close()
            self.heldout_file.close()
