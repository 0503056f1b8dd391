"""The pruner state machine: observe (importance) → mask (schedule) → shrink (slice).

It works on plain tensors handed to it by the caller (full, rank-identical weights and
gradients), so it is usable without the training loop and without DeepSpeed.
"""
from __future__ import annotations

import torch

from homodistil.kernels.importance import importance, init_state

from .groups import Group, dead_entries, live_entries, shrink_tensors
from .schedule import cubic_sparsity


class Pruner:
    """Holds importance state and masks for ``groups``; all ranks hold identical copies.

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
        self.observed = 0  # observations folded into ``scores`` since the last mask update
        self.window_steps = 0  # windowed PLATON: steps in the current window's running mean
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # per-parameter metric state

    # --- schedule -------------------------------------------------------------------------
    def sparsity(self, step: int) -> dict[str, float]:
        """Target sparsity per kind: the cubic schedule, or the final sparsity from step 0 (``oneshot``)."""
        if self.schedule == "oneshot":
            return dict(self.s_final)
        return {k: cubic_sparsity(step, self.t_i, self.t_f, s) for k, s in self.s_final.items()}

    # --- observe --------------------------------------------------------------------------
    def observe(self, tensors, fold: bool = True) -> None:
        """Fold one step's importance into the group scores.

        ``tensors``: ``{name: (weight, grad)}`` or ``(name, (weight, grad))`` pairs (a generator) with
        the full tensors of each parameter in ``self.params``. A generator lets the caller gather
        one full parameter at a time (ZeRO-3), so a large model is never whole on a rank: only
        its per-row/column scores are kept. ``sensitivity`` averages |w·g| over the steps since
        the last mask update; ``platon`` and ``magnitude`` use the latest value (PLATON smooths
        in its own EMA state).

        Windowed PLATON (``platon_window`` > 1): each step's |w·g| goes into a running mean per
        entry (state ``window``); ``fold`` (the caller's: this step ends a window) folds that mean
        into the two EMAs, as one PLATON step with I = the window's mean, and updates the scores.
        Without ``fold`` the scores stay those of the last fold.
        """
        rows, cols = {}, {}
        dead = dead_entries(self.groups, self.masks, self.params)  # dead entries score 0, as if shrunk away
        for name, (weight, grad) in (tensors.items() if isinstance(tensors, dict) else tensors):
            if name not in self.params:
                continue
            if name not in self.state:
                self.state[name] = init_state(weight, self.metric)
                if self.windowed:  # running mean of |w·g| over the window so far, fp32, weight's shape
                    self.state[name]["window"] = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if name in dead:  # w = 0 gives |w·g| = 0 and w² = 0; PLATON's state there is 0 (update_masks)
                weight = weight * live_entries(dead[name], weight.dim()).to(weight.device)
            if self.windowed:
                rows[name], cols[name] = self._observe_window(name, weight, grad, fold)
            else:
                rows[name], cols[name] = importance(weight, grad, self.metric, self.state[name], self.beta1,
                                                    self.beta2)
        assert set(rows) == set(self.params), sorted(set(self.params) - set(rows))[:3]
        if self.windowed:
            self.window_steps = 0 if fold else self.window_steps + 1
            if not fold:
                return
        for g in self.groups:
            score = torch.zeros(g.size)
            for s in g.slices:
                score += (rows if s.dim == 0 else cols)[s.param][s.span(g.size)].cpu()
            if self.metric == "magnitude":
                score = score.sqrt()
            if self.metric == "sensitivity":
                self.scores[g.name] = (self.scores[g.name] * self.observed + score) / (self.observed + 1)
            else:
                self.scores[g.name] = score
        self.observed += 1

    def _observe_window(self, name: str, weight: torch.Tensor, grad: torch.Tensor, fold: bool):
        """Windowed PLATON for one parameter: add |w·g| to the window's running mean; at ``fold``, one PLATON
        update with that mean as I (the kernel with w = mean, g = 1) and the mean restarts. Returns the row and
        column scores at a fold, else (None, None)."""
        state = self.state[name]
        window, k = state["window"], self.window_steps  # (N, K) or (N,); k steps already in the mean
        window.mul_(k / (k + 1)).add_((weight.float() * grad.float().reshape(weight.shape)).abs(), alpha=1 / (k + 1))
        if not fold:
            return None, None
        ema = {"ema": state["ema"], "unc": state["unc"]}
        scores = importance(window, torch.ones_like(window), "platon", ema, self.beta1, self.beta2)
        window.zero_()
        return scores

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
            score = self.scores[g.name].view(g.blocks, g.block_size).clone()
            score[~mask] = -float("inf")
            order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :keep]
            new = torch.zeros_like(mask).scatter_(1, order, True)
            assert bool((new <= mask).all()) and bool((new.sum(1) == keep).all())
            self.masks[g.name] = new.view(-1)
            changed = True
        if changed:
            self.observed = 0
            dead = dead_entries(self.groups, self.masks, self.state)
            for name, state in self.state.items():  # PLATON's Ī and U of dead entries: 0, so Ī·U is 0 from now on
                for t in state.values():
                    if name in dead:
                        t.mul_(live_entries(dead[name], t.dim()).to(t.device))
        return changed

    def is_dense(self) -> bool:
        return all(bool(m.all()) for m in self.masks.values())

    # --- shrink ---------------------------------------------------------------------------
    def keep_indices(self) -> dict[str, torch.Tensor]:
        return {name: m.nonzero().squeeze(1) for name, m in self.masks.items()}

    def shrink(self, new_groups: list[Group]) -> dict[str, torch.Tensor]:
        """Drop masked units from the pruner's own state; returns the kept indices per group
        (the caller slices parameters and optimizer state with the same indices)."""
        keep = self.keep_indices()
        for key in {k for st in self.state.values() for k in st}:
            sliced = shrink_tensors({n: st[key] for n, st in self.state.items() if key in st}, self.groups, keep)
            for name, tensor in sliced.items():
                self.state[name][key] = tensor
        self.scores = {g: self.scores[g][idx] for g, idx in keep.items()}
        self.groups = new_groups
        by_name = {g.name: g for g in new_groups}
        for name, idx in keep.items():
            assert by_name[name].size == idx.numel(), (name, by_name[name].size, idx.numel())
        self.masks = {g.name: torch.ones(g.size, dtype=torch.bool) for g in new_groups}
        return keep

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": self.masks, "scores": self.scores, "observed": self.observed,
                "window_steps": self.window_steps,
                "state": {n: {k: t.cpu() for k, t in st.items()} for n, st in self.state.items()}}

    def load_state_dict(self, sd: dict, device: torch.device | str) -> None:
        """Masks and scores as saved; the importance state on ``device``, where the gradients it
        is updated with live (a resumed GPU run once handed CPU state to the CUDA kernel)."""
        for name, mask in sd["masks"].items():
            assert mask.shape == self.masks[name].shape, (name, tuple(mask.shape), tuple(self.masks[name].shape))
        self.masks = {n: m.clone() for n, m in sd["masks"].items()}
        self.scores = {n: s.clone() for n, s in sd["scores"].items()}
        self.observed = sd["observed"]
        self.window_steps = sd.get("window_steps", 0)  # absent in checkpoints from before platon_window
        self.state = {n: {k: t.to(device) for k, t in st.items()} for n, st in sd["state"].items()}
