"""The pruner state machine: observe (importance) → mask (schedule) → shrink (slice).

It works on plain tensors handed to it by the caller, so it is usable without the training
loop and without DeepSpeed. Importance is measured on *fragments*: flat element ranges
``[start, start + n)`` of a row-major parameter. Under ZeRO each rank measures its own
partition, the partial row and column sums of all parameters go through one caller-given
reduction (a sum over ranks), and every rank ends with the same scores (docs/design.md §5).
A single process (or a caller with full, identical tensors on every rank) hands whole
tensors to :meth:`observe`.
"""
from __future__ import annotations

import math

import torch

from homodistil.kernels.importance import importance, init_state

from .groups import Group, dead_entries, shrink_tensors
from .schedule import cubic_sparsity


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


class Pruner:
    """Holds masks and scores (identical on all ranks) and the importance state of this rank's
    fragments for ``groups``.

    ``kept_fn(sparsity: dict[kind, float]) -> dict[kind, int]`` gives the units kept per block
    at given per-kind sparsities (the adapter's ``kept`` bound to the teacher config).
    """

    def __init__(self, groups: list[Group], kept_fn, *, metric: str, s_final: dict[str, float],
                 t_i: int, t_f: int, beta1: float = 0.85, beta2: float = 0.95, schedule: str = "cubic",
                 platon_window: int = 1):
        self.groups = groups
        self.kept_fn = kept_fn
        self.metric, self.beta1, self.beta2 = metric, beta1, beta2
        self.windowed = metric == "platon" and platon_window > 1  # |w·g| averaged per window, EMAs once per window
        self.s_final, self.t_i, self.t_f, self.schedule = dict(s_final), t_i, t_f, schedule
        self.params = sorted({s.param for g in groups for s in g.slices})
        self.masks = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
        self.scores = {g.name: torch.zeros(g.size) for g in groups}  # fp32 (size,)
        # each unit's index in the starting (teacher-width) model, (size,) int64 (the export's kept_units.json);
        # None for a scratch student (the recipe clears it) or after resuming a checkpoint that predates it
        self.origin: dict[str, torch.Tensor] | None = {g.name: torch.arange(g.size) for g in groups}
        self.observed = 0  # observations folded into ``scores`` since the last mask update
        self.window_steps = 0  # windowed PLATON: steps in the current window's running mean
        self.partitioned = False  # state holds this rank's fragments only (measured with a reduction)
        # per parameter: its full shape, this rank's fragment (start, numel), the metric's flat state
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fragments: dict[str, tuple[int, int]] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # {name: {ema, unc[, window]: fp32 (numel,)}}
        # PLATON (per step): the measured step's new ema/unc, written beside the state and swapped in at
        # commit (a skipped step keeps the old state); allocated once, reused every step
        self.spare: dict[str, dict[str, torch.Tensor]] = {}
        self.pending: dict[str, tuple] = {}  # measured, not yet committed (the optimizer has not decided)
        self.unsliced = None  # partitioned state between shrink() and reshard()
        self.dead: dict = {}  # dead_entries of the current masks, rebuilt where masks change (_masks_changed)
        self.live: dict[str, tuple] = {}  # per parameter: live_vectors on its device (cleared with ``dead``)
        self._masks_changed()

    # --- schedule -------------------------------------------------------------------------
    def sparsity(self, step: int) -> dict[str, float]:
        """Target sparsity per kind: the cubic schedule, or the final sparsity from step 0 (``oneshot``)."""
        if self.schedule == "oneshot":
            return dict(self.s_final)
        return {k: cubic_sparsity(step, self.t_i, self.t_f, s) for k, s in self.s_final.items()}

    # --- observe --------------------------------------------------------------------------
    def observe(self, tensors, fold: bool = True) -> None:
        """Measure and commit one step from full tensors, identical wherever this is called.

        ``tensors``: ``{name: (weight, grad)}`` or ``(name, (weight, grad))`` pairs (grad None for
        ``magnitude``) covering ``self.params``; others are ignored.
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
        ``sensitivity``/``magnitude`` as partial row and column sums, PLATON as I = |w·g| (its
        state is only updated by a step the optimizer applied). Dead entries (a masked row or
        column) count with w = 0, as if shrunk away.
        """
        numel = weight.numel()
        if name not in self.fragments:
            self.shapes[name], self.fragments[name] = tuple(shape), (start, numel)
            self.state[name] = init_state(weight, self.metric)
            if self.windowed:  # running mean of |w·g| over the window so far
                self.state[name]["window"] = torch.zeros(numel, dtype=torch.float32, device=weight.device)
        assert self.fragments[name] == (start, numel), (name, self.fragments[name], (start, numel))
        live = self._live(name, weight.device)  # (cached: no host work per step)
        if self.metric != "platon":
            self.pending[name] = self._partial(name, weight, grad, self.metric, {}, live)
        elif not self.windowed:  # the new EMAs go beside the state: the optimizer may still skip this step
            state = self.state[name]
            spare = self.spare.get(name)
            if spare is None:
                spare = self.spare[name] = {k: torch.empty_like(state[k]) for k in ("ema", "unc")}
            self.pending[name] = self._partial(name, weight, grad, "platon", state, live, spare)
        else:
            ipt = torch.mul(weight.float(), grad.float()).abs_()  # I, fp32 (numel,); the window's mean takes it
            zero_dead(ipt, self.shapes[name], start, live)
            self.pending[name] = (ipt,)

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

    def _partial(self, name: str, weight: torch.Tensor, grad: torch.Tensor | None, metric: str,
                 state: dict[str, torch.Tensor], live: tuple = (None, None),
                 out: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (R,) and column (C,) sums of a fragment's element scores (its other rows/columns 0),
        one kernel call per block of :func:`pieces` on views of the flat tensors, state, ``out``
        buffers and live vectors ``live`` (a dead entry counts with w = 0, as if shrunk away)."""
        shape, (start, numel) = self.shapes[name], self.fragments[name]
        rows = torch.zeros(shape[0], dtype=torch.float32, device=weight.device)
        cols = torch.zeros(shape[1] if len(shape) == 2 else 1, dtype=torch.float32, device=weight.device)
        live_rows, live_cols = live
        for offset, row, n_rows, col, n_cols in pieces(shape, start, numel):
            span = slice(offset, offset + n_rows * n_cols)
            r, c = importance(weight[span].view(n_rows, n_cols), None if grad is None else grad[span], metric,
                              {k: t[span] for k, t in state.items()}, self.beta1, self.beta2,
                              None if live_rows is None else live_rows[row:row + n_rows],
                              None if live_cols is None else live_cols[col:col + n_cols],
                              None if out is None else {k: t[span] for k, t in out.items()})
            rows[row:row + n_rows] += r
            cols[col:col + n_cols] += c
        return rows, cols

    def discard(self) -> None:
        """Forget the measured step (the optimizer skipped it: no importance state moves)."""
        self.pending = {}

    @torch.no_grad()
    def commit(self, fold: bool = True, reduce=None) -> None:
        """Fold the measured step into the state and, at ``fold``, into the group scores.

        ``reduce(t)``: sums a 1-D fp32 tensor over the ranks in place (None: the fragments are
        whole tensors, identical wherever this runs); one call per committed step, on the partial
        sums of every parameter concatenated. ``sensitivity`` averages |w·g| over the steps since
        the last mask update; ``platon`` and ``magnitude`` use the latest value (PLATON smooths in
        its own EMA state).

        Windowed PLATON (``platon_window`` > 1): each step's I goes into a running mean per entry
        (state ``window``); ``fold`` (the caller's: this step ends a window) folds that mean into
        the two EMAs, as one PLATON step with I = the window's mean, and updates the scores.
        Without ``fold`` the scores stay those of the last fold (and nothing is reduced).
        """
        assert set(self.pending) == set(self.params), sorted(set(self.params) - set(self.pending))[:3]
        self.partitioned = reduce is not None
        pending, self.pending = self.pending, {}
        if self.metric == "platon" and not self.windowed:  # measure wrote the new EMAs beside the state
            for name in pending:
                state, spare = self.state[name], self.spare[name]
                self.state[name], self.spare[name] = dict(spare), dict(state)
        elif self.metric == "platon":
            for name, (ipt,) in pending.items():
                state = self.state[name]
                if self.windowed:
                    k = self.window_steps  # steps already in the mean
                    state["window"].mul_(k / (k + 1)).add_(ipt, alpha=1 / (k + 1))
                    if not fold:
                        continue
                    ipt = state["window"]
                ema = {"ema": state["ema"], "unc": state["unc"]}  # the kernel with w = I, g = 1: |w·g| = I
                ones = torch.ones((), dtype=ipt.dtype, device=ipt.device).expand(ipt.shape)  # once per window
                pending[name] = self._partial(name, ipt, ones, "platon", ema)
                state["window"].zero_()
            self.window_steps = 0 if fold else self.window_steps + 1
            if not fold:
                return
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
            if self.metric == "magnitude":
                score = score.sqrt()
            if self.metric == "sensitivity":
                previous = self.scores[g.name].to(score.device)  # on the host after a resume
                self.scores[g.name] = (previous * self.observed + score) / (self.observed + 1)
            else:
                self.scores[g.name] = score
        self.observed += 1

    # --- mask -----------------------------------------------------------------------------
    def update_masks(self, step: int) -> bool:
        """Mask the lowest-scored live units of each group down to the schedule's width.

        Masks only ever shrink; within a group every block (head) keeps the same width,
        ties broken by the lower index. Returns whether any mask changed.
        """
        kept = self.kept_fn(self.sparsity(step))
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
