"""The pruner state machine: measure → commit (importance) → mask (schedule) → shrink (slice).

It works on plain tensors handed to it by the caller, so it is usable without the training
loop and without DeepSpeed. The metric is an :class:`~homodistil.pruning.importance.Importance`;
the pruner drives it and knows no metric. Importance is measured on *fragments*: flat element ranges
``[start, start + n)`` of a row-major parameter. Under ZeRO each rank measures its own
partition, the partial row and column sums of all parameters go through one caller-given
reduction (a sum over ranks), and every rank ends with the same scores (docs/design.md §5).
A single process (or a caller with full, identical tensors on every rank) hands whole
tensors to :meth:`observe`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from homodistil.kernels.importance import importance

from .groups import Group, dead_entries, shrink_tensors
from .importance import Importance, Sums


def pieces(shape: tuple[int, ...], start: int, numel: int) -> list[tuple[int, int, int, int, int]]:
    """Blocks ``(offset, row, rows, col, cols)`` that cover flat elements ``[start, start + numel)``
    of a row-major ``shape`` (1-D: (R, 1)): a partial first row, whole rows, a partial last row.
    Each block is contiguous in the range, from ``offset`` (relative to ``start``) on."""
    width = shape[1] if len(shape) == 2 else 1
    out, pos, end = [], start, start + numel
    while pos < end:
        row, col = divmod(pos, width)
        if col or end - pos < width:  # inside one row
            n = min(width - col, end - pos)
            out.append((pos - start, row, 1, col, n))
        else:
            rows = (end - pos) // width
            n = rows * width
            out.append((pos - start, row, rows, 0, width))
        pos += n
    return out


def live_vectors(units: dict[int, torch.Tensor], shape: tuple[int, ...],
                 device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 live rows (R,) and columns (C,) of a parameter on ``device`` (1 live, 0 masked; None: no
    masked unit along that dim), from ``units`` of :func:`dead_entries`. O(R + C): built once per mask
    change, never per step, and never an entry-sized mask."""
    rows = units[0].to(device=device, dtype=torch.float32) if 0 in units else None
    cols = units[1].to(device=device, dtype=torch.float32) if 1 in units and len(shape) == 2 else None
    return rows, cols


def zero_dead(flat: torch.Tensor, shape: tuple[int, ...], start: int,
              live: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """Zero, in place, the entries of fragment ``flat`` (elements ``[start, start + n)`` of ``shape``)
    that lie in a dead row or column (``live`` from :func:`live_vectors`), block by block of
    :func:`pieces`: no mask of the fragment's size."""
    rows, cols = live
    for offset, row, n_rows, col, n_cols in pieces(shape, start, flat.numel()):
        block = flat[offset:offset + n_rows * n_cols].view(n_rows, n_cols)
        if rows is not None:
            block.mul_(rows[row:row + n_rows].view(-1, 1))
        if cols is not None:
            block.mul_(cols[col:col + n_cols].view(1, -1))


@dataclass(frozen=True)
class Fragment:
    """Flat elements ``[start, start + numel)`` of a parameter of full ``shape``, as a metric sees them,
    with the parameter's ``live`` rows and columns (:func:`live_vectors`)."""

    shape: tuple[int, ...]
    start: int
    numel: int
    live: tuple[torch.Tensor | None, torch.Tensor | None]

    def sums(self, score: str, weight: torch.Tensor, grad: torch.Tensor | None,
             state: dict[str, torch.Tensor] | None = None, out: dict[str, torch.Tensor] | None = None,
             betas: tuple[float, float] = (0.85, 0.95), masked: bool = True, sums: bool = True) -> Sums | None:
        """Row (R,) and column (C,) sums of the element ``score`` (``kernels.importance.SCORES``) over the
        fragment (its other rows/columns 0), one kernel call per block of :func:`pieces` on views of the
        flat ``weight``, ``grad``, ``state`` and ``out`` buffers; at ``masked`` a dead entry counts with
        w = 0, as if shrunk away. ``sums=False``: PLATON's state moves, nothing is summed (None)."""
        state = state or {}
        rows = torch.zeros(self.shape[0], dtype=torch.float32, device=weight.device) if sums else None
        cols = torch.zeros(self.shape[1] if len(self.shape) == 2 else 1, dtype=torch.float32,
                           device=weight.device) if sums else None
        live_rows, live_cols = self.live if masked else (None, None)
        for offset, row, n_rows, col, n_cols in pieces(self.shape, self.start, self.numel):
            span = slice(offset, offset + n_rows * n_cols)
            got = importance(weight[span].view(n_rows, n_cols), None if grad is None else grad[span], score,
                             {k: t[span] for k, t in state.items()}, *betas,
                             None if live_rows is None else live_rows[row:row + n_rows],
                             None if live_cols is None else live_cols[col:col + n_cols],
                             None if out is None else {k: t[span] for k, t in out.items()}, sums,
                             numel=math.prod(self.shape))  # (dispatch by the parameter, not the block)
            if sums:
                rows[row:row + n_rows] += got[0]
                cols[col:col + n_cols] += got[1]
        return (rows, cols) if sums else None

    def zero_dead(self, flat: torch.Tensor) -> None:
        """Zero the fragment's dead entries of ``flat`` (numel,) in place (:func:`zero_dead`)."""
        zero_dead(flat, self.shape, self.start, self.live)


class Pruner:
    """Holds masks and scores (identical on all ranks) and the importance state of this rank's
    fragments for ``groups``.

    ``kept(step) -> dict[kind, int]`` gives the units kept per block at a step (the run's
    ``schedule.PruningSchedule.kept``: the schedule owns the widths).
    """

    def __init__(self, groups: list[Group], kept: Callable[[int], dict[str, int]], *, importance: Importance):
        self.groups = groups
        self.kept = kept
        self.importance = importance
        self.params = sorted({s.param for g in groups for s in g.slices})
        self.masks = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
        self.scores = {g.name: torch.zeros(g.size) for g in groups}  # fp32 (size,)
        # each unit's index in the starting (teacher-width) model, (size,) int64 (the export's kept_units.json);
        # None for a scratch student (the recipe clears it) or after resuming a checkpoint that predates it
        self.origin: dict[str, torch.Tensor] | None = {g.name: torch.arange(g.size) for g in groups}
        self.observed = 0  # observations folded into ``scores`` since the last mask update
        self.window_steps = 0  # steps committed since the last fold (a windowed metric holds them back)
        self.partitioned = False  # state holds this rank's fragments only (measured with a reduction)
        # per parameter: its full shape, this rank's fragment (start, numel), the metric's flat state
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fragments: dict[str, tuple[int, int]] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # the metric's, e.g. PLATON's {ema, unc[, window]}
        # the metric's buffers kept from step to step (PLATON: the measured step's new ema/unc, written
        # beside the state and swapped in at commit); dropped when the fragments change
        self.spare: dict[str, dict[str, torch.Tensor]] = {}
        # measured, not yet committed (the optimizer has not decided): name -> (Fragment, the measurement)
        self.pending: dict[str, tuple[Fragment, tuple]] = {}
        self.unsliced = None  # partitioned state between shrink() and reshard()
        self.dead: dict = {}  # dead_entries of the current masks, rebuilt where masks change (_masks_changed)
        self.live: dict[str, tuple] = {}  # per parameter: live_vectors on its device (cleared with ``dead``)
        self._masks_changed()

    # --- observe --------------------------------------------------------------------------
    def observe(self, tensors, fold: bool = True) -> None:
        """Measure and commit one step from full tensors, identical wherever this is called.

        ``tensors``: ``{name: (weight, grad)}`` or ``(name, (weight, grad))`` pairs (grad None where the
        metric does not need it) covering ``self.params``; others are ignored.
        """
        for name, (weight, grad) in (tensors.items() if isinstance(tensors, dict) else tensors):
            if name in self.params:
                self.measure(name, tuple(weight.shape), 0, weight.reshape(-1),
                             None if grad is None else grad.reshape(-1))
        self.commit(fold)

    @torch.no_grad()
    def measure(self, name: str, shape: tuple[int, ...], start: int, weight: torch.Tensor,
                grad: torch.Tensor | None) -> None:
        """This step's importance of one fragment: ``weight`` and ``grad`` are flat elements
        ``[start, start + n)`` of parameter ``name`` (full ``shape``), any float dtype.

        Kept pending until :meth:`commit` (the step was applied) or :meth:`discard` (it was not):
        the metric's measurement (:meth:`Importance.measure`; its state only moves with a step the
        optimizer applied). Dead entries (a masked row or column) count with w = 0, as if shrunk away.
        """
        numel = weight.numel()
        if name not in self.fragments:
            self.shapes[name], self.fragments[name] = tuple(shape), (start, numel)
            self.state[name] = self.importance.new_state(numel, weight.device)
        assert self.fragments[name] == (start, numel), (name, self.fragments[name], (start, numel))
        frag = Fragment(self.shapes[name], start, numel, self._live(name, weight.device))  # (live: cached)
        self.pending[name] = (frag, self.importance.measure(frag, weight, grad, self.state[name],
                                                           self.spare.setdefault(name, {})))

    def _masks_changed(self) -> None:
        """The masks changed (a mask update, a shrink, a resume): rebuild which rows and columns are dead
        (host work over the masks, O(Σ R + C)); the device vectors follow at the next measure."""
        self.dead, self.live = dead_entries(self.groups, self.masks, self.params), {}

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks (bool (size,) per group, on the host), e.g. with rank 0's."""
        self.masks = masks
        self._masks_changed()

    def _live(self, name: str, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Live rows and columns of parameter ``name`` on ``device`` (built once per mask change)."""
        if name not in self.live:
            units = self.dead.get(name)
            self.live[name] = (None, None) if units is None else live_vectors(units, self.shapes[name], device)
        return self.live[name]

    def discard(self, fold: bool = False, reduce=None) -> None:
        """Forget the measured step (the optimizer skipped it: no importance state moves). At ``fold`` (the
        caller's: the scores are due now) a metric whose scores are a function of its state
        (:meth:`Importance.state_sums`) folds them from the state as it stands: the scores the last applied
        step would have folded, as if every step folded (``reduce``: as for :meth:`commit`)."""
        pending, self.pending = self.pending, {}
        if not fold or not pending:
            return
        sums = {name: self.importance.state_sums(frag, self.state[name]) for name, (frag, _) in pending.items()}
        if all(s is not None for s in sums.values()):
            self._fold(sums, reduce)

    @torch.no_grad()
    def commit(self, fold: bool = True, reduce=None) -> None:
        """Fold the measured step into the state and, at ``fold``, into the group scores.

        ``reduce(t)``: sums a 1-D fp32 tensor over the ranks in place (None: the fragments are
        whole tensors, identical wherever this runs); one call per committed step, on the partial
        sums of every parameter concatenated. The metric moves its state (:meth:`Importance.commit`)
        and folds the group sums into the scores (:meth:`Importance.fold`). PLATON folds only at ``fold``
        (the caller's, ``PruningSchedule.folds``: a window ends, or the scores are read); until then the
        scores stay those of the last fold (and nothing is summed or reduced).
        """
        assert set(self.pending) == set(self.params), sorted(set(self.params) - set(self.pending))[:3]
        self.partitioned = reduce is not None
        pending, self.pending = self.pending, {}
        sums = {name: self.importance.commit(frag, measured, self.state[name], self.spare.setdefault(name, {}),
                                             self.window_steps, fold)
                for name, (frag, measured) in pending.items()}
        if any(s is None for s in sums.values()):  # held back: the window goes on
            self.window_steps += 1
            return
        self.window_steps = 0
        self._fold(sums, reduce)

    def _fold(self, pending: dict[str, Sums], reduce) -> None:
        """Fold every parameter's row and column sums (``reduce``d over the ranks) into the group scores."""
        flat = torch.cat([t for name in self.params for t in pending[name]])  # (Σ R + C,)
        if reduce is not None:
            reduce(flat)
        rows, cols, at = {}, {}, 0  # views of flat where it lives: no host copy, no sync in a training step
        for name in self.params:
            r, c = (t.numel() for t in pending[name])
            rows[name], cols[name] = flat[at:at + r], flat[at + r:at + r + c]
            at += r + c
        for g in self.groups:
            score = torch.zeros(g.size, device=flat.device)
            for s in g.slices:
                score += (rows if s.dim == 0 else cols)[s.param][s.span(g.size)]
            self.scores[g.name] = self.importance.fold(self.scores[g.name], score, self.observed)
        self.observed += 1

    # --- mask -----------------------------------------------------------------------------
    def update_masks(self, step: int) -> bool:
        """Mask the lowest-scored live units of each group down to the schedule's width.

        Masks only ever shrink; within a group every block (head) keeps the same width,
        ties broken by the lower index. Returns whether any mask changed.
        """
        kept = self.kept(step)
        changed = False
        for g in self.groups:
            mask = self.masks[g.name].view(g.blocks, g.block_size)
            keep = min(kept[g.kind], int(mask[0].sum()))
            if keep == int(mask[0].sum()):
                continue
            score = self.scores[g.name].to("cpu", copy=True).view(g.blocks, g.block_size)  # (device) scores
            score[~mask] = -float("inf")
            order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :keep]
            new = torch.zeros_like(mask).scatter_(1, order, True)
            assert bool((new <= mask).all()) and bool((new.sum(1) == keep).all())
            self.masks[g.name] = new.view(-1)
            changed = True
        if changed:
            self.observed = 0
            self._masks_changed()
            dead = dead_entries(self.groups, self.masks, self.state)
            for name, state in self.state.items():  # PLATON's Ī and U of dead entries: 0, so Ī·U is 0 from now on
                if name in dead:
                    for t in state.values():
                        zero_dead(t, self.shapes[name], self.fragments[name][0],
                                  live_vectors(dead[name], self.shapes[name], t.device))
        return changed

    def is_dense(self) -> bool:
        return all(bool(m.all()) for m in self.masks.values())

    # --- shrink ---------------------------------------------------------------------------
    def keep_indices(self) -> dict[str, torch.Tensor]:
        return {name: m.nonzero().squeeze(1) for name, m in self.masks.items()}

    def shrink(self, new_groups: list[Group]) -> dict[str, torch.Tensor]:
        """Drop masked units from masks, scores and (whole-tensor) importance state; returns the
        kept indices per group (the caller slices parameters and optimizer state with the same
        indices). Partitioned state waits for :meth:`reshard`, once the new partitioning exists."""
        keep = self.keep_indices()
        if self.partitioned:
            self.unsliced = (self.groups, keep, self.state, self.fragments, self.shapes)
            self.state, self.fragments, self.shapes = {}, {}, {}
        else:
            state, shapes = self.state, self.shapes
            self.state, self.fragments, self.shapes = {}, {}, {}  # a metric without state re-records at measure
            for name, st in state.items():
                for key, t in st.items():
                    sliced = shrink_tensors({name: t.view(shapes[name])}, self.groups, keep)[name]
                    self.state.setdefault(name, {})[key] = sliced.reshape(-1)
                    self.shapes[name], self.fragments[name] = tuple(sliced.shape), (0, sliced.numel())
        self.scores = {g: self.scores[g][idx] for g, idx in keep.items()}
        if self.origin is not None:
            self.origin = {g: self.origin[g][idx] for g, idx in keep.items()}
        self.groups = new_groups
        by_name = {g.name: g for g in new_groups}
        for name, idx in keep.items():
            assert by_name[name].size == idx.numel(), (name, by_name[name].size, idx.numel())
        self.masks = {g.name: torch.ones(g.size, dtype=torch.bool) for g in new_groups}
        self.spare = {}
        self._masks_changed()
        return keep

    def reshard(self, gather, ranges: dict[str, tuple[int, int]]) -> None:
        """After :meth:`shrink` of partitioned state: this rank's kept entries in the new partitioning.

        One parameter's state tensor at a time (every rank, same order): ``gather(local, start,
        numel)`` returns the full flat tensor from every rank's fragment; it is sliced to the kept
        units and this rank's new fragment ``ranges[name]`` = (start, numel) is kept. Peak extra
        memory: the largest parameter, twice.
        """
        if self.unsliced is None:
            return
        groups, keep, state, fragments, shapes = self.unsliced
        self.unsliced, self.spare = None, {}
        for name in sorted(state):
            for key in sorted(state[name]):
                local = state[name].pop(key)
                full = gather(local, fragments[name][0], math.prod(shapes[name])).view(shapes[name])
                sliced = shrink_tensors({name: full}, groups, keep)[name]
                start, numel = ranges[name]
                self.state.setdefault(name, {})[key] = sliced.reshape(-1)[start:start + numel].clone()
                self.shapes[name], self.fragments[name] = tuple(sliced.shape), (start, numel)
                del full, sliced

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What every rank holds alike (rank 0 saves it)."""
        return {"masks": self.masks, "scores": {n: s.cpu() for n, s in self.scores.items()}, "observed": self.observed,
                "window_steps": self.window_steps, "partitioned": self.partitioned, "origin": self.origin}

    def local_state_dict(self) -> dict:
        """This rank's importance state, on the CPU, with the fragments it covers (each rank saves its own)."""
        return {"shapes": dict(self.shapes), "fragments": dict(self.fragments),
                "state": {n: {k: t.cpu() for k, t in st.items()} for n, st in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Masks, scores and counters as saved (the importance state: :meth:`load_local_state`)."""
        for name, mask in sd["masks"].items():
            assert mask.shape == self.masks[name].shape, (name, tuple(mask.shape), tuple(self.masks[name].shape))
        self.set_masks({n: m.clone() for n, m in sd["masks"].items()})
        self.scores = {n: s.clone() for n, s in sd["scores"].items()}
        self.observed = sd["observed"]
        self.window_steps = sd.get("window_steps", 0)  # absent in checkpoints from before platon_window
        self.partitioned = sd.get("partitioned", False)
        origin = sd.get("origin")  # absent in older checkpoints
        self.origin = {n: o.clone() for n, o in origin.items()} if origin is not None else None

    def load_local_state(self, saved, ranges: dict[str, tuple[int, int]], device: torch.device | str) -> None:
        """This rank's importance state from every rank's saved :meth:`local_state_dict` (``saved``: an
        iterable, read one at a time), for fragments ``ranges`` (name -> (start, numel); whole tensors
        where the state is not partitioned), on ``device``, where the gradients it is updated with live
        (a resumed GPU run once handed CPU state to the CUDA kernel). Any saved partitioning works:
        each saved fragment's overlap with this rank's is copied."""
        self.state, self.fragments, self.shapes, self.spare, self.live = {}, {}, {}, {}, {}
        for piece in saved:
            for name, st in piece["state"].items():
                shape = tuple(piece["shapes"][name])
                if name not in self.state:
                    start, numel = ranges[name] if self.partitioned else (0, math.prod(shape))
                    self.shapes[name], self.fragments[name] = shape, (start, numel)
                    self.state[name] = {k: torch.zeros(numel, dtype=torch.float32, device=device) for k in st}
                start, numel = self.fragments[name]
                lo_saved = piece["fragments"][name][0]
                lo, hi = max(start, lo_saved), min(start + numel, lo_saved + piece["fragments"][name][1])
                for key, t in st.items():
                    if hi > lo:
                        self.state[name][key][lo - start:hi - start] = t[lo - lo_saved:hi - lo_saved].to(device)
