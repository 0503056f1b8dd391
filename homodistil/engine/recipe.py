"""The HomoDistil recipe: distill a teacher copy while pruning it, shrink in place, export.

Read ``Recipe.train`` top to bottom for the algorithm (docs/design.md §1); set-up, the engine
rebuild on shrink, checkpoints and logging live in the helpers around it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from deepspeed import zero
from torch import nn
from transformers import set_seed

from homodistil.config import Config, ConfigError, dump_config
from homodistil.data.batches import BatchSource, check_global_batch, scored_positions
from homodistil.data.batches import from_config as data_from_config
from homodistil.lm.probe import HeldoutProbe
from homodistil.pruning.adapters import get_adapter
from homodistil.pruning.groups import KINDS, live_numel, shrink_tensors
from homodistil.pruning.masked import apply_masks, make_maskable
from homodistil.cost import arch_from_hf_config
from homodistil.pruning.importance import from_config as importance_from_config
from homodistil.pruning.pruner import Pruner
from homodistil.pruning.schedule import PruningSchedule, folds_at

from . import checkpoint, faults, hostmem, numerics
from .dist import device, init_distributed
from .export import export_dense
from .fragments import fragment, fragment_range, gather_fragments
from .losses import distill_losses
from .models import (Student, hub_revision, load_teacher, load_tokenizer, student_config,
                     student_groups, teacher_config, teacher_outputs, teacher_source, tiny_config, tokenizer_name)
from .prepare import PREP_FILE, missing_head, prepare_teacher
from .prepare import cache_dir as prepare_cache_dir
from .prepare import fingerprint, verify_prepared
from .private import private_dir
from .monitor import Monitor
from .perf import Perf, timed
from .zero import gather, own_pieces, restore, restore_torch_linear, stream_pieces


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"trainer.output_dir '{path}' is not writable: {err.strerror}") from None


def _architecture(config: dict) -> dict:
    """A model config without the fields that saving or loading rewrites."""
    ignored = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"}
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in ignored}


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give every parameter of ``module`` left on the meta device uninitialised storage on ``device``
    (a parameter shared by two modules, such as tied embeddings, stays shared); buffers are untouched.
    The caller writes every parameter before use."""
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, prm in list(sub._parameters.items()):
            if prm is not None and prm.is_meta:
                if id(prm) not in made:
                    made[id(prm)] = nn.Parameter(torch.empty_like(prm, device=device), requires_grad=prm.requires_grad)
                sub._parameters[name] = made[id(prm)]


def _untimed(name: str):
    """Stands in for ``Perf.phase`` where no timers run yet (a one-shot run's calibration, in set-up)."""
    return contextlib.nullcontext()


class Recipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_requested = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Recipe":
        """The run's parts in the order they are needed, each made by one step from the arguments it is
        given; what the loop and the helpers around it use is kept on ``self``. Every step checks what it
        can before the expensive ones run (config and paths, then tokenizer, targets and data, then
        models), so a user mistake costs seconds."""
        cfg = self.cfg
        self.rank, self.world, self.device, self.host_group = self._setup_process()
        # on CPU, before the first large tensor: freed blocks are reused, not faulted in afresh every step
        host_memory = hostmem.keep_freed_memory() if self.device.type == "cpu" and cfg.trainer.keep_freed_memory else None
        armed = faults.configure(self.rank)  # the faults a test injects (faults.py); none unless asked for
        self.out = self._setup_output_dir()
        self.ckpt_root = self.out / "checkpoints"
        self.tokenizer, self.objective = self._setup_tokenizer_and_targets()
        self.data = self._load_data(self.tokenizer, self.objective)
        check_global_batch(self.data, cfg.global_batch(self.world), cfg.data)

        teacher, self.teacher_dir = self._setup_teacher(self.tokenizer, self.objective, self.data)
        self.tcfg = teacher.config
        self.adapter = get_adapter(self.tcfg.model_type)
        self.teacher_arch = arch_from_hf_config(self.tcfg.to_dict())  # for the FLOPs of perf/mfu
        self.hidden_pairs = self.adapter.hidden_pairs(self.tcfg) if cfg.loss.alpha_hidden else []
        self.attention_pairs = self.adapter.attention_pairs(self.tcfg) if cfg.loss.alpha_attention else []
        self.needs_teacher = bool(cfg.loss.alpha_pred or cfg.loss.alpha_hidden or cfg.loss.alpha_attention)
        # when to score, mask and shrink, and the (aligned) widths; scratch and one-shot students are at the final
        # widths from step 0: nothing to prune while training
        self.schedule = PruningSchedule.for_run(cfg, self.adapter, self.tcfg)

        # the checkpoint to resume from (its meta: step, widths, ...), if any; damaged ones are set aside
        self.resumed_tag, meta, damaged = self._find_checkpoint(self.tcfg)
        # the student's widths: the checkpoint's, else the teacher's (a scratch student: the final ones)
        start = cfg.pruning.sparsity.model_dump() if cfg.model.init == "scratch" else dict.fromkeys(KINDS, 0.0)
        self.kept = meta["kept"] if meta else self.schedule.widths(start)
        expected = self.schedule.widths_after(meta["step"]) if meta else None
        if meta and meta["kept"] != expected:
            raise ConfigError(
                f"{self.ckpt_root / self.resumed_tag} holds a student of widths {meta['kept']} at step {meta['step']}, "
                f"where this config's schedule has {expected} (were pruning.* "
                "settings, pruning.width_multiple included, changed since it was saved, or was it saved by an older "
                "version?): resume with the settings it was made with, or use a new trainer.output_dir")
        # a new HomoDistil student starts as the teacher; a resumed one gets the checkpoint's weights
        copy_of = teacher if not meta and cfg.model.init == "teacher" else None
        student, self.groups, self.ckpt_bytes = self._setup_student(self.kept, copy_of)
        self.teacher = self._host_teacher(teacher)
        self.pruner = self._make_pruner(self.groups)
        if not meta and cfg.pruning.schedule == "oneshot":
            student, self.groups, self.kept = self._prune_at_start(student)
        resized = self._world_change(self.resumed_tag, meta) if self.resumed_tag else None
        if resized is not None:  # the module holds the weights when the engine is built (as after a shrink)
            with torch.no_grad():
                for name, prm in student.named_parameters():
                    prm.copy_(resized[0][name])
        self.engine = self._init_engine(student)
        self.heldout = (HeldoutProbe(self.data, self.teacher, self.adapter.head, cfg.evaluate.heldout_blocks,
                                     cfg.micro_batch_size, self.device) if cfg.trainer.eval_every else None)

        # the loop's state
        self.step = 0
        self.shrink_host_peaks: list[list[tuple[int, int]]] = []  # per shrink and rank (_shrink)
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient
        self.held: list[tuple[int, dict[str, float], torch.Tensor]] = []  # steps not yet logged (_log)
        removed = checkpoint.remove_incomplete(self.ckpt_root) if self.rank == 0 else []
        if self.resumed_tag:
            self._resume(self.resumed_tag, resized)
            self.step = self._last_saved = meta["step"]
        elif self.rank == 0:
            (self.out / "config.yaml").write_text(dump_config(cfg))
        self.live_params = self._param_count(live=True)  # the masked model's size; recounted where masks change
        # progress bar, TensorBoard and metrics files; perf timers (each on self as soon as made: close() closes it)
        self.monitor = Monitor(self.out, self.rank, cfg.trainer.max_steps, self.step, cfg.trainer.progress)
        self.perf = Perf(cfg, self.device, self.world, self.out, self.rank)
        self._note_start(self.resumed_tag, removed, armed, damaged, host_memory)
        return self

    def _setup_process(self) -> tuple[int, int, torch.device, dist.ProcessGroup | None]:
        """Distributed init and seeds: (rank, world size, device, the host group of the stop flag)."""
        rank, world, _ = init_distributed()
        # the stop flag's collective runs on the host: a gloo group beside NCCL, so reading it waits for no device
        host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        set_seed(self.cfg.trainer.seed + rank)  # torch, numpy, random; dropout differs per rank, as in any DP run
        return rank, world, device(), host_group

    def _setup_output_dir(self) -> Path:
        """``trainer.output_dir``, found writable by rank 0 before any rank goes on."""
        out = Path(self.cfg.trainer.output_dir)
        if self.rank == 0:
            _check_writable(out)
        dist.barrier()
        return out

    def _setup_tokenizer_and_targets(self) -> tuple:
        """(tokenizer, objective): the target widths are checked against the teacher's declared config
        before any data or model work; the objective ("mlm" or "causal") picks the batches."""
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        source = teacher_source(cfg.model)
        declared = teacher_config(source, cfg.model.revision) if source else tiny_config(cfg.model, len(tokenizer),
                                                                    tokenizer.pad_token_id)
        declared_adapter = get_adapter(declared.model_type)
        declared_adapter.check_targets(declared, cfg.pruning.sparsity.model_dump())
        longest = declared_adapter.longest_sequence(declared)
        if longest is not None and cfg.data.max_seq_length > longest:  # else an index error at step 1
            raise ConfigError(f"data.max_seq_length ({cfg.data.max_seq_length}) is longer than the teacher's "
                              f"position embeddings allow ({longest} tokens)")
        return tokenizer, declared_adapter.objective

    def _setup_teacher(self, tokenizer, objective: str, data: BatchSource) -> tuple:
        """(teacher model, its directory): prepared first if it lacks an MLM head; a tiny teacher is saved
        so that evaluation can compare with it."""
        path = self._teacher_path(tokenizer, objective, data)
        teacher = self._load_teacher(path, tokenizer)
        if path is None:
            path = str(self.out / "teacher")
            if self.rank == 0:
                teacher.save_pretrained(path, safe_serialization=True)
                tokenizer.save_pretrained(path)
        return teacher, path

    def _find_checkpoint(self, tcfg) -> tuple[str | None, dict | None, list[str]]:
        """(tag, meta, damaged): the checkpoint to resume from, if any, made with teacher config ``tcfg``;
        damaged ones are set aside here and reported once the monitor is up."""
        tag, damaged = checkpoint.find_resumable(self.ckpt_root) if self.cfg.trainer.resume else (None, [])
        if tag:
            checkpoint.check_loadable(self.ckpt_root / tag)  # before DeepSpeed's loader, which unpickles without the weights-only guard
        meta = checkpoint.read_meta(self.ckpt_root, tag) if tag else None
        if meta and _architecture(meta["teacher_config"]) != _architecture(tcfg.to_dict()):
            raise ConfigError(f"{self.ckpt_root / tag} was made with another teacher: use a new trainer.output_dir")
        return tag, meta, damaged

    def _setup_student(self, kept: dict[str, int], copy_of) -> tuple[Student, list, int]:
        """(student, its groups, the bytes of one checkpoint): the student at widths ``kept``, with room for
        its checkpoints, and the weights of ``copy_of`` (a teacher) if given."""
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.trainer.seed)  # a scratch student's init: the same on every rank, seeded
            student, groups = self._build_student(kept)
        ckpt_bytes = checkpoint.estimate_bytes(sum(p.numel() for p in student.parameters()), cfg.bf16)
        problem = checkpoint.space_problem(self.ckpt_root, ckpt_bytes)
        if problem:
            raise checkpoint.CheckpointError(f"trainer.output_dir: {problem}")
        if copy_of is not None:
            with zero.GatheredParameters(list(copy_of.parameters()), enabled=cfg.model.teacher_zero3):
                student.lm.load_state_dict(copy_of.state_dict())
        return student, groups, ckpt_bytes

    def _make_pruner(self, groups) -> Pruner:
        p = self.cfg.pruning
        pruner = Pruner(groups, self.schedule.kept, importance=importance_from_config(p))
        if self.cfg.model.init == "scratch":
            pruner.origin = None  # a scratch student's units are none of the teacher's: no kept_units.json
        return pruner

    def _note_start(self, tag: str | None, removed: list[str], armed: list, damaged: list[str],
                    host_memory: str | None) -> None:
        """The run's opening lines: what runs where, from which checkpoint, what was cleaned up or injected, how
        host memory is handled."""
        cfg = self.cfg
        self.monitor.note(f"world size {self.world}, ZeRO stage {cfg.zero_stage}, "
                          f"{'bf16' if cfg.bf16 else 'fp32'}, teacher {cfg.model.teacher} "
                          f"({self._param_count() / 1e6:.2f}M student parameters, init {cfg.model.init}, "
                          f"schedule {'oneshot' if self.schedule.oneshot else 'cubic'}), data: {self.data.describe()}"
                          + (f"; resumed from step {self.step} ({tag})" if tag else "")
                          + (f"; removed incomplete checkpoint(s) {', '.join(removed)}" if removed else "")
                          + (f"; injected faults {armed}" if armed else ""))
        self.monitor.note(f"perf/mfu against {self.perf.peak:.4g} TFLOP/s per device ({self.perf.peak_source})"
                          if self.perf.peak else f"no perf/mfu: {self.perf.peak_source}")
        for line in [*damaged, *([host_memory] if host_memory else [])]:
            self.monitor.note(line)

    def _teacher_path(self, tokenizer, objective: str, data: BatchSource) -> str | None:
        """The teacher's weights; a teacher without an MLM head is prepared first (rank 0, cached), on ``data``."""
        m = self.cfg.model
        source = teacher_source(m)
        if source is None or m.prepare.steps == 0 or objective == "causal" or not missing_head(source):
            return source  # preparing gives a head-less encoder an MLM head; a causal LM is used as it is
        if hub_revision(source, m.revision):  # the preparation and its cache know the teacher by name only
            raise ConfigError(f"teacher '{m.teacher}' has no MLM head, and preparing one does not follow "
                              f"model.revision yet: download that revision to a directory and set model.teacher to it")
        if not data.prebuilt:
            raise ConfigError(f"teacher '{m.teacher}' has no MLM head and preparing one needs pre-built blocks: "
                              f"set data.streaming=false, or give a teacher with a head")
        d = self.cfg.data
        out = prepare_cache_dir(source, json.dumps([d.source, d.max_seq_length, d.mlm_probability, d.max_documents,
                                                    fingerprint(tokenizer_name(m))]), m.prepare)
        if self.rank == 0 and not (out / PREP_FILE).exists():
            head = get_adapter(teacher_config(source, m.revision).model_type).head
            info = prepare_teacher(source, out, data, m.prepare, head, tokenizer, self.cfg.trainer.progress)
            print(f"prepared the teacher's MLM head ({info['steps']} steps): held-out masked-token accuracy "
                  f"{100 * info['heldout_masked_accuracy_before']:.1f}% -> {100 * info['heldout_masked_accuracy']:.1f}%; "
                  f"cached in {out}", flush=True)
        dist.barrier()
        verify_prepared(out)  # every rank: each reads the files (a node may have its own cache)
        return str(out)

    def _load_teacher(self, path: str | None, tokenizer):
        if not self.cfg.model.teacher_zero3 or path is None:
            return load_teacher(self.cfg.model, len(tokenizer), path, tokenizer.pad_token_id)
        from transformers.integrations import HfDeepSpeedConfig  # noqa: PLC0415
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

        keep_alive = HfDeepSpeedConfig(self._teacher_ds_config())  # partitions weights while loading
        try:
            return load_teacher(self.cfg.model, len(tokenizer), path, tokenizer.pad_token_id)
        finally:
            unset_hf_deepspeed_config()
            del keep_alive

    def _load_data(self, tokenizer, objective: str) -> BatchSource:
        d = self.cfg.data
        cache = Path(d.cache_dir) if d.cache_dir else self.out / "cache"

        def build():
            return data_from_config(d, tokenizer, seed=self.cfg.trainer.seed, objective=objective,
                                    rank=self.rank, world=self.world, cache_dir=cache,
                                    heldout_blocks=self.cfg.evaluate.heldout_blocks)

        if d.streaming:
            return build()
        data = None
        if self.rank == 0:  # rank 0 tokenizes and caches; the others read the cache
            created = not cache.exists()
            private_dir(cache)  # the run's text, tokenized: its owner's to read
            try:
                data = build()
            except BaseException:
                if created:  # a bad data source leaves nothing behind
                    shutil.rmtree(cache, ignore_errors=True)
                raise
        dist.barrier()
        return data if self.rank == 0 else build()

    def _teacher_ds_config(self) -> dict:
        """The frozen teacher's own ZeRO-3 engine: no optimizer, so no optimizer state."""
        zero_cfg = {"stage": 3}
        if self.cfg.model.teacher_offload:
            zero_cfg["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {"train_micro_batch_size_per_gpu": self.cfg.micro_batch_size, "zero_optimization": zero_cfg,
                "bf16": self.cfg.deepspeed.get("bf16", {"enabled": False}), "steps_per_print": 2**31}

    def _host_teacher(self, teacher):
        """Replicated (moved, cast to the training precision) or partitioned with ZeRO-3."""
        if self.cfg.model.teacher_zero3:
            engine, *_ = deepspeed.initialize(model=teacher, config=self._teacher_ds_config())
            engine.eval()
            return engine
        return teacher.to(self.device, torch.bfloat16 if self.cfg.bf16 else torch.float32)

    def _build_student(self, kept: dict[str, int], empty: bool = False):
        """The student at widths ``kept`` and its groups. ``empty``: its parameters are left uninitialised
        (built on the meta device, then given storage; buffers are built as usual), for a caller that
        writes every one of them (a shrink, a one-shot cut): no random initialisation of a model whose
        weights are thrown away."""
        config = student_config(self.adapter, self.tcfg, kept, self.cfg.model)
        rng = torch.random.get_rng_state()  # building must not move the dropout RNG stream
        with init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext():
            student = Student(self.adapter.build(config, self.tcfg), self.hidden_pairs, self.tcfg.hidden_size,
                              self.adapter.head)
        if empty:
            materialize(student, "cpu")
            student.lm.tie_weights()  # init_empty_weights re-registers a tied parameter as a new one: tie again
        torch.random.set_rng_state(rng)
        groups = student_groups(self.adapter, config, len(self.hidden_pairs))
        make_maskable(student, groups, self.adapter.drop_ins)
        return student, groups

    def _lr_factor(self, s: int) -> float:
        o, total = self.cfg.optimizer, self.cfg.trainer.max_steps
        if s < o.warmup_steps:
            return (s + 1) / o.warmup_steps
        frac = (s - o.warmup_steps) / max(1, total - o.warmup_steps)
        return max(o.min_lr_ratio, 1.0 - (1.0 - o.min_lr_ratio) * frac)

    def _init_engine(self, student):
        o = self.cfg.optimizer
        decay = [p for p in student.parameters() if p.dim() >= 2]
        no_decay = [p for p in student.parameters() if p.dim() < 2]  # biases and norms
        # ZeRO 1-3 skip a step with a non-finite gradient norm themselves; at stage 0 our AdamW does
        adamw = numerics.AdamW if self.cfg.zero_stage == 0 else torch.optim.AdamW
        optimizer = adamw([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=o.lr, betas=o.betas, eps=o.eps, fused=self.device.type == "cuda" or None)
        ds_config = {"steps_per_print": 2**31, **self.cfg.deepspeed}
        engine, *_ = deepspeed.initialize(
            model=student, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor))
        return engine

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        cfg, schedule = self.cfg, self.schedule
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if self._main_thread() else None
        try:
            self.perf.start()  # the first step's time includes the step-0 evaluation
            if self.step == 0:  # where each variant starts from (a resumed run logged its step already)
                self._evaluate_heldout()
            phase = self.perf.phase  # times each part of the step (perf/* scalars, profiler ranges)
            while self.step < cfg.trainer.max_steps:
                started = time.perf_counter()
                self.perf.begin_step(self.step + 1)
                # the step of docs/design.md §1: 1. batch, 2. forward teacher and student on it, 3. losses, 4. backward
                terms_sum: dict[str, torch.Tensor] = {}  # fp64 () on the device: read at log steps only
                for micro in range(cfg.grad_accum):
                    terms = self._forward_backward(self.engine, self._batch(micro), self.engine.backward, phase,
                                                   fault_step=self.step + 1)
                    for k, v in terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().double() / cfg.grad_accum
                    if micro < cfg.grad_accum - 1:
                        self.engine.step()  # counts the micro-batch; DeepSpeed updates only at the boundary
                # 4. then importance, measured on this rank's fragments of this step's gradients (before the optimizer uses
                # them), committed after it if it applied the step
                if schedule.scores(self.step + 1):
                    self._observe()
                with phase("optimizer"):  # 5. the optimizer step
                    self.engine.step()
                self.step += 1
                skipped = self._skipped_update(terms_sum)
                self._commit_importance(skipped)
                # 6. masks follow the cubic schedule, 7. masked units are removed for real, 8. log, probe, checkpoint
                if schedule.masks(self.step):
                    self._update_masks()
                if schedule.shrinks(self.step):
                    self._shrink()
                self._log(terms_sum, time.perf_counter() - started, skipped)
                self._evaluate_heldout()
                faults.point("step", self.step)
                if self._should_stop():
                    self.monitor.note(f"SIGTERM: saving at step {self.step} and stopping")
                    self.save()
                    return
                if self.bad_steps >= cfg.trainer.max_bad_steps:
                    self._stop_on_bad_steps()
                if cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0:
                    self.save()
            if not self._saved_at_step():
                self.save()
            if cfg.trainer.export:
                self.export(self.out / "export")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _forward_backward(self, model, batch: dict[str, torch.Tensor], backward, phase=_untimed,
                          fault_step: int | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch: forward the student (``model``: the engine, or the bare student that a one-shot
        run calibrates) and the teacher on the same batch (input_ids, attention_mask (B, T); scored, targets
        (M,): :meth:`_device_batch`), the loss terms (each a () tensor), then ``backward(terms["loss"])``.
        ``fault_step``: the optimizer step whose loss an injected fault may corrupt (faults.py); the
        calibration has none."""
        want_hidden, want_attn = bool(self.hidden_pairs), bool(self.attention_pairs)
        with phase("student"):
            student = model(batch["input_ids"], batch["attention_mask"], batch["scored"], want_hidden, want_attn)
        with phase("teacher"):
            teacher = teacher_outputs(self.teacher, self.adapter.head, batch, want_hidden, want_attn,
                                      self.hidden_pairs, self.attention_pairs) if self.needs_teacher else {}
        with phase("student"):
            terms = distill_losses(self.cfg.loss, batch["targets"], student, teacher)
            if fault_step is not None:
                terms["loss"] = faults.loss(terms["loss"], fault_step)
            backward(terms["loss"])
        return terms

    @timed("data")
    def _batch(self, micro: int) -> dict[str, torch.Tensor]:
        return self._device_batch(self.step, micro)

    def _device_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch ``micro`` of 0-based step ``step`` on the device, with its scored positions."""
        batch = self.data.batch(step, micro, grad_accum=self.cfg.grad_accum, micro_batch=self.cfg.micro_batch_size,
                                rank=self.rank, world=self.world)
        batch.update(scored_positions(batch["labels"]))  # on the host, before the batch moves
        return {k: v.to(self.device) for k, v in batch.items()}

    @timed("heldout")
    def _evaluate_heldout(self) -> None:
        """Held-out KL(teacher || student) and MLM loss at step 0, every ``eval_every`` steps and at the end."""
        every = self.cfg.trainer.eval_every
        if every and (self.step % every == 0 or self.step == self.cfg.trainer.max_steps):
            self.monitor.heldout(self.step, self.heldout(self.engine.module.lm))

    def _prune_at_start(self, student: Student) -> tuple[Student, list, dict[str, int]]:
        """One-shot: score the dense student on ``calibration_steps`` batches with the run's metric (the
        training's micro-steps without an optimizer step; the batches are the first training batches), mask to
        the final sparsity at once; returns the student rebuilt at the final widths, its groups and widths."""
        cfg = self.cfg
        wanted = set(self.pruner.params)
        student.to(self.device).train()

        def backward(loss):  # the plain module's gradients: the mean over the micro-batches, as the engine's
            (loss / cfg.grad_accum).backward()

        with torch.random.fork_rng(devices=[]):  # calibration must not move the training's dropout stream
            for k in range(cfg.pruning.calibration_steps):
                student.zero_grad(set_to_none=True)
                for micro in range(cfg.grad_accum):
                    self._forward_backward(student, self._device_batch(k, micro), backward)
                tensors = {}
                for name, prm in student.named_parameters():
                    if name in wanted:
                        grad = prm.grad if prm.grad is not None else torch.zeros_like(prm)
                        dist.all_reduce(grad)  # the global batch's mean gradient, as in training
                        tensors[name] = (prm.detach(), grad / self.world)
                last = k == cfg.pruning.calibration_steps - 1  # the mask is cut after it: the scores are read
                self.pruner.observe(tensors, fold=folds_at(k + 1, cfg.pruning.platon_window, read=last))
        student.zero_grad(set_to_none=True)
        self.pruner.update_masks(0)
        params = {n: prm.detach().cpu() for n, prm in student.named_parameters()}
        kept = self._mask_widths()
        student, groups = self._build_student(kept, empty=True)  # every parameter is copied in below
        keep = self.pruner.shrink(groups)  # the pruner's own state is cut here
        params = shrink_tensors(params, self.groups, keep)  # self.groups: still the dense student's
        with torch.no_grad():
            for name, prm in student.named_parameters():
                prm.copy_(params[name])
        return student, groups, kept

    def _mask_widths(self) -> dict[str, int]:
        """The units per block each kind keeps under the current masks (the widths to shrink to)."""
        return {g.kind: int(self.pruner.masks[g.name].view(g.blocks, -1)[0].sum()) for g in self.groups}

    @timed("importance")
    def _observe(self) -> None:
        """Measure importance on this rank's own fragment of every scored parameter (its fp32 master
        values and its slice of the rank-averaged gradient; engine/fragments.py): no gather, no
        collective. The measurement waits for :meth:`_commit_importance`, after the optimizer's step."""
        scored, need_grad = set(self.pruner.params), self.pruner.importance.needs_grad
        for name, prm in self.engine.module.named_parameters():
            if name in scored:
                start, weight, grad = fragment(prm, self.rank, self.world, need_grad)
                self.pruner.measure(name, tuple(getattr(prm, "ds_shape", prm.shape)), start, weight, grad)

    @timed("importance")
    def _commit_importance(self, skipped: bool) -> None:
        """Fold the measured step in (one all-reduce of every partial row/column sum), unless the
        optimizer skipped the step for a non-finite gradient: its own overflow check decides, the
        same on every rank, so no pass over the gradients is added (a metric without gradient needs none)."""
        if not self.pruner.pending:
            return
        if skipped and self.pruner.importance.needs_grad:
            self.pruner.discard(self.schedule.folds(self.step), reduce=dist.all_reduce)
            return
        self.pruner.commit(self.schedule.folds(self.step), reduce=dist.all_reduce)

    def _skipped_update(self, terms: dict[str, float]) -> bool:
        """Whether the optimizer skipped this step for a non-finite gradient norm (numerics.py).

        The skipped step changed no weight or optimizer state; the LR schedule still moves on
        (DeepSpeed holds it back), so that it stays a function of the step.
        """
        if self.engine.was_step_applied():
            self.bad_steps = 0
            return False
        self.engine.lr_scheduler.step()
        self.bad_steps += 1
        self.monitor.note(f"step {self.step}: non-finite loss or gradient (loss {terms['loss']:.4g} on rank 0): "
                          f"update skipped, {self.bad_steps} in a row "
                          f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps})")
        return True

    def _stop_on_bad_steps(self) -> None:
        """Too many bad steps in a row: save (the weights are still the last good ones) and stop."""
        first = self.step - self.bad_steps + 1
        tag = self.save()
        raise numerics.TrainingStopped(
            f"steps {first}-{self.step} all had a non-finite loss or gradient (trainer.max_bad_steps="
            f"{self.cfg.trainer.max_bad_steps}): stopped; {self.ckpt_root / tag} holds the weights of step "
            f"{first - 1} and resumes with the next batch (lower optimizer.lr or check the data first)")

    @timed("mask")
    def _update_masks(self) -> None:
        if self.pruner.update_masks(self.step):
            masks = [self.pruner.masks]
            dist.broadcast_object_list(masks, src=0)  # the ranks' scores agree; rank 0's masks are the law
            self.pruner.set_masks(masks[0])
            self.live_params = self._param_count(live=True)
            apply_masks(self.engine.module, self.groups, {k: m.to(self.device) for k, m in self.pruner.masks.items()})

    @timed("shrink")
    def _shrink(self) -> None:
        """Remove masked units (docs/design.md §4): stream each parameter's fp32 value and Adam moments,
        cut to the kept units, keeping this rank's piece of each; rebuild the engine at the kept widths;
        write the pieces back. No rank holds more than one small parameter or one row chunk of a large one
        beyond its own share."""
        started = time.perf_counter()
        before = hostmem.start_peak()
        old_groups, kept = self.groups, self._mask_widths()
        planned = self.schedule.shrunk[self.step]  # what the planner charged: the masks must agree
        assert all(planned[k] == n for k, n in kept.items()), (self.step, kept, planned)
        config = student_config(self.adapter, self.tcfg, kept, self.cfg.model)
        keep = self.pruner.shrink(student_groups(self.adapter, config, len(self.hidden_pairs)))  # the pruner's own state
        pieces, adam_step = stream_pieces(self.engine, old_groups, keep)
        streamed = hostmem.peak_since(before)
        global_steps, global_samples = self.engine.global_steps, self.engine.global_samples
        scheduler_state = self.engine.lr_scheduler.state_dict()
        self.engine.destroy()
        faults.point("shrink", self.step)
        del self.engine
        hostmem.release()  # the old engine's memory goes back before the new one is built
        student, self.groups = self._build_student(kept, empty=True)  # restore() writes every parameter
        self.kept = kept
        self.engine = self._init_engine(student)
        restore(self.engine, pieces, adam_step)
        self.pruner.reshard(gather_fragments, self._fragment_ranges())
        self._set_schedule(global_steps, global_samples, scheduler_state)
        self.live_params = self._param_count(live=True)
        self._note_shrink(time.perf_counter() - started, streamed, hostmem.peak_since(before))

    def _note_shrink(self, seconds: float, streamed: int, whole: int) -> None:
        """Log a finished shrink: the new widths and size, its time, and every rank's peak extra host memory
        (bytes above the shrink's start: streaming the state, and the whole shrink with the rebuild)."""
        peaks = [None] * self.world
        dist.all_gather_object(peaks, (streamed, whole))
        self.shrink_host_peaks.append(peaks)
        self.monitor.note(f"step {self.step}: shrunk to {self.kept} ({self._param_count() / 1e6:.2f}M parameters) "
                          f"in {seconds:.2f}s; peak extra host memory per rank (MiB): "
                          f"streaming the state {', '.join(f'{a / 2**20:.1f}' for a, _ in peaks)}, "
                          f"whole shrink {', '.join(f'{b / 2**20:.1f}' for _, b in peaks)}")

    def _fragment_ranges(self) -> dict[str, tuple[int, int]]:
        """This rank's fragment (start, numel) of every scored parameter of the engine."""
        scored = set(self.pruner.params)
        return {name: fragment_range(prm, self.rank, self.world)
                for name, prm in self.engine.module.named_parameters() if name in scored}

    def _set_schedule(self, global_steps: int, global_samples: int, scheduler_state: dict) -> None:
        """Put a freshly built engine's step counters and LR schedule where the run was."""
        self.engine.global_steps, self.engine.global_samples = global_steps, global_samples
        self.engine.lr_scheduler.load_state_dict(scheduler_state)
        for group, lr in zip(self.engine.optimizer.param_groups, self.engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr

    # ------------------------------------------------------------------ logging
    def _param_count(self, live: bool = False) -> int:
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.engine.module.named_parameters()
                  if n.startswith("lm.")}  # ds_shape: the full shape of a ZeRO-3 partitioned parameter
        masks = self.pruner.masks if live else {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        return live_numel(shapes, self.groups, masks)

    def _log_step(self, step: int) -> bool:
        return step % self.cfg.trainer.log_every == 0 or step == self.cfg.trainer.max_steps

    @timed("log")
    def _log(self, terms: dict[str, torch.Tensor], step_time: float, skipped: bool) -> None:
        """Hold the step's scalars; its loss terms stay on the device until a log step (``trainer.log_every``),
        where every held step is reduced over the ranks and read at once: a step's only host sync."""
        sparsity = self.schedule.sparsity(self.step)
        scalars: dict[str, float] = {}
        scalars.update({f"prune/sparsity_{k}": v for k, v in sparsity.items()})
        scalars["prune/sparsity"] = max(sparsity.values())
        scalars["prune/live_params"] = float(self.live_params)
        scalars["time/step_s"] = step_time
        scalars["lr"] = self.engine.optimizer.param_groups[0]["lr"]
        scalars["skipped"] = float(skipped)  # 1: a non-finite loss or gradient, no update
        scalars.update(self.perf.end_step(self.step, arch_from_hf_config(self.engine.module.lm.config.to_dict()),
                                          self.teacher_arch))
        self.held.append((self.step, scalars, torch.stack([terms[k] for k in sorted(terms)])))  # (terms,) fp64
        self.loss_keys = [f"loss/{'total' if k == 'loss' else k}" for k in sorted(terms)]
        if self._log_step(self.step):
            self._flush_log()

    def _flush_log(self) -> None:
        """Write the held steps (metrics.jsonl, TensorBoard, the log line): one all-reduce and one host copy
        of their loss terms (at log steps, and before a checkpoint so that it never precedes its rows)."""
        if not self.held:
            return
        held, self.held = self.held, []
        values = torch.stack([v for _, _, v in held])  # (steps, terms) fp64
        dist.all_reduce(values)
        for (step, scalars, _), row in zip(held, values.tolist()):
            losses = {k: v / self.world for k, v in zip(self.loss_keys, row)}
            self.monitor.step(step, {**losses, **scalars}, self._log_step(step))

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        tokenizer = tokenizer_name(self.cfg.model)
        return {"step": self.step, "kept": self.kept, "teacher_config": self.tcfg.to_dict(),
                "model_type": self.tcfg.model_type, "tokenizer": tokenizer, "n_proj": len(self.hidden_pairs),
                "world_size": self.world, "zero_stage": self.cfg.zero_stage,
                "global_batch": self.cfg.global_batch(self.world)}

    @timed("checkpoint")
    def save(self) -> str:
        self._flush_log()
        tag = checkpoint.save(self.engine, self.ckpt_root, self.step, self._meta(), self.pruner.state_dict(),
                              self.pruner.local_state_dict(), self.rank, self.data.state_dict(), self.ckpt_bytes,
                              keep=self.cfg.trainer.keep_checkpoints, protect=self.resumed_tag)
        self._last_saved = self.step
        return tag

    def _saved_at_step(self) -> bool:
        return getattr(self, "_last_saved", None) == self.step

    def _world_change(self, tag: str, meta: dict) -> tuple | None:
        """Checkpoint ``tag``'s full state when it was saved at another world size (else None), or a
        one-line error where it cannot resume here (another global batch; a stream; another stage)."""
        directory = self.ckpt_root / tag
        saved_world = meta["world_size"]
        global_batch = self.cfg.global_batch(self.world)
        if meta.get("global_batch", global_batch) != global_batch:
            raise ConfigError(
                f"{directory} was saved with a global batch of {meta['global_batch']} (micro-batch x "
                f"gradient accumulation x world size), this run has {global_batch}: at world size {self.world} set "
                f"deepspeed.train_micro_batch_size_per_gpu x deepspeed.gradient_accumulation_steps to "
                f"{meta['global_batch'] / self.world:g}, or use a new trainer.output_dir")
        if saved_world == self.world:
            return None
        if self.cfg.data.streaming:
            raise ConfigError(f"{directory}: a streamed run resumes at the world size it was saved with "
                              f"({saved_world}), not {self.world} (each rank's place in the stream is its own): "
                              f"relaunch with {saved_world} processes, or train on pre-built blocks "
                              f"(data.streaming=false), which resume at any world size")
        if meta["zero_stage"] != self.cfg.zero_stage:
            raise ConfigError(f"{directory}: changing the world size ({saved_world} -> {self.world}) resumes at "
                              f"the ZeRO stage the checkpoint was saved with ({meta['zero_stage']}), "
                              f"not {self.cfg.zero_stage}")
        if self.cfg.zero_stage == 0:
            return None  # stage 0 files hold whole tensors: DeepSpeed's own loader reads them at any world size
        return checkpoint.world_free_state(directory)

    def _resume(self, tag: str, resized: tuple | None) -> None:
        """Load checkpoint ``tag`` into the engine, pruner, data and RNG: DeepSpeed's own loader, or ``resized``
        (full tensors of a checkpoint from another world size, already in the module: ``setup``) written into
        the optimizer."""
        if resized is None:
            load_path, _ = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
            if load_path is None:
                raise ConfigError(f"could not load checkpoint {self.ckpt_root / tag}")
        else:
            params, moments, adam_step, counters = resized
            names = [name for name, _ in self.engine.module.named_parameters()]
            restore(self.engine, {n: own_pieces({"param": params[n], **moments[n]}) for n in names}, adam_step)
            self.engine.skipped_steps = counters["skipped_steps"]
            self._set_schedule(counters["global_steps"], counters["global_samples"], counters["lr_scheduler"])
        pruner_state, rank_state = checkpoint.load_run_state(self.ckpt_root, tag, self.rank)
        self.pruner.load_state_dict(pruner_state)
        self.pruner.load_local_state(checkpoint.importance_states(self.ckpt_root, tag), self._fragment_ranges(),
                                     self.device)
        if rank_state is not None:  # None: a rank the checkpoint's (smaller) world did not have
            self.data.load_state_dict(rank_state.get("data", {}))
            checkpoint.set_rng_state(rank_state["rng"])
        apply_masks(self.engine.module, self.groups, {k: m.to(self.device) for k, m in self.pruner.masks.items()})

    def export(self, out_dir: Path) -> None:
        params, _, _ = gather(self.engine)
        if self.rank == 0:
            export_dense(params, self.pruner.masks, self._meta(), out_dir, self.pruner.origin)
            self.monitor.note(f"exported the student to {out_dir}")
        dist.barrier()

    # ------------------------------------------------------------------ signals
    @staticmethod
    def _main_thread() -> bool:  # signal handlers can only be installed from the main thread
        return threading.current_thread() is threading.main_thread()

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    @timed("log")  # a collective every step, on the host
    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])  # on the host (gloo)
        dist.all_reduce(flag, group=self.host_group)  # any rank signalled -> all ranks save together
        return bool(flag.numpy()[0] > 0)  # a host tensor (.numpy() refuses a device one): no device sync

    def close(self) -> None:
        if hasattr(self, "perf"):
            self.perf.close()
        if hasattr(self, "monitor"):
            self.monitor.close()
        restore_torch_linear()


def distill(cfg: Config) -> Recipe:
    """The whole ``homodistil distill``: set up, train (and export), always close."""
    recipe = Recipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.close()
    return recipe


def ready_teacher(cfg: Config) -> str | None:
    """Only the set-up that prepares (and caches) the teacher, and its path: ``compare`` calls it once, in a process
    of its own, before its workers start, so that they do not each prepare the same teacher at the same time."""
    recipe = Recipe(cfg)
    recipe.rank, recipe.world, recipe.device, _ = recipe._setup_process()
    recipe.out = recipe._setup_output_dir()
    tokenizer, objective = recipe._setup_tokenizer_and_targets()
    return recipe._teacher_path(tokenizer, objective, recipe._load_data(tokenizer, objective))
