"""Importance metrics as objects, in the manner of Torch-Pruning's ``Importance`` classes.

Each metric owns everything that differs between metrics: whether it needs the gradient, the
state it keeps per scored weight (and that state's bytes, for the cost model), what it measures
in a step, what it does once the optimizer applied the step, and how a group's summed element
scores fold into the group's score. The :class:`~homodistil.pruning.pruner.Pruner` drives them
on fragments (flat element ranges of a parameter, docs/design.md §5) and knows no metric; the
element formulas run in ``homodistil.kernels.importance`` (Triton on CUDA, torch elsewhere).

The config names a metric (``pruning.metric``); :data:`METRICS` maps that name to its class and
:func:`from_config` builds it. Adding a metric is a class here, an entry in :data:`METRICS`, the
name in ``config.PruningConfig.metric`` and its test.

Shapes: a fragment is ``numel`` flat elements of a parameter of full shape (R, C) (a 1-D
parameter is (R, 1)); row and column sums are fp32 (R,) and (C,); state tensors are flat fp32
(numel,) on the parameters' device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # the pruner hands its fragments in; importing it here would be circular
    from .pruner import Fragment

Sums = tuple[torch.Tensor, torch.Tensor]  # fp32 (R,), (C,): a fragment's row and column sums


class Importance:
    """One metric. A step is ``measure`` (after backward, before the optimizer decides), then
    ``commit`` (the optimizer applied the step) or nothing (it skipped it); ``fold`` turns a
    group's summed scores into its score."""

    name: ClassVar[str]  # pruning.metric
    title: ClassVar[str]  # for people (homodistil plan)
    needs_grad: ClassVar[bool] = True

    @classmethod
    def from_config(cls, pruning) -> Importance:
        """The metric with its settings from ``pruning`` (a ``config.PruningConfig``)."""
        return cls()

    def bytes_per_weight(self) -> int:
        """fp32 bytes this metric keeps per scored weight while it runs (state, buffers and what a
        measured step holds until its commit), summed over the ranks (each keeps its share)."""
        return 0

    def new_state(self, numel: int, device: torch.device) -> dict[str, torch.Tensor]:
        """State carried between steps for a fragment of ``numel`` elements (flat fp32 tensors)."""
        return {}

    def measure(self, frag: Fragment, weight: torch.Tensor, grad: torch.Tensor | None,
                state: dict[str, torch.Tensor], spare: dict[str, torch.Tensor]) -> tuple:
        """This step's measurement of the fragment (``weight``, ``grad``: flat (numel,), any float
        dtype), held until :meth:`commit`; ``state`` must not move before then. ``spare``: buffers the
        metric may keep for the fragment from step to step (emptied when the fragments change)."""
        raise NotImplementedError

    def commit(self, frag: Fragment, pending: tuple, state: dict[str, torch.Tensor],
               spare: dict[str, torch.Tensor], steps: int, fold: bool) -> Sums | None:
        """The step was applied: move the state and return the row and column sums to fold into the
        scores, or None where this step folds nothing yet (``steps``: steps committed since the last
        fold; ``fold``: the caller's, this step ends a window)."""
        return pending

    def fold(self, previous: torch.Tensor, score: torch.Tensor, observed: int) -> torch.Tensor:
        """A group's new score from its summed element scores ``score`` (size,), its ``previous``
        score and the ``observed`` folds since the last mask update."""
        return score

    def state_sums(self, frag: Fragment, state: dict[str, torch.Tensor]) -> Sums | None:
        """The row and column sums the state alone determines (PLATON's S = Ī·U at a fold, including
        one due at a step the optimizer skipped), or None where the metric's sums need a measurement."""
        return None


class Magnitude(Importance):
    """S = w²; a group scores the square root of its sum (the L2 norm of its weights)."""

    name = title = "magnitude"
    needs_grad = False

    def measure(self, frag, weight, grad, state, spare):
        return frag.sums("square", weight, None)

    def fold(self, previous, score, observed):
        return score.sqrt()


class Sensitivity(Importance):
    """S = |w·g| (first-order loss change, Molchanov et al.), averaged over the steps since the
    last mask update."""

    name = title = "sensitivity"

    def measure(self, frag, weight, grad, state, spare):
        return frag.sums("abs_product", weight, grad)

    def fold(self, previous, score, observed):
        previous = previous.to(score.device)  # on the host after a resume
        return (previous * observed + score) / (observed + 1)


class Platon(Importance):
    """PLATON (Zhang et al., ICML 2022): EMAs Ī of I = |w·g| and U of |I − Ī|; S = Ī·U.

    ``window`` = 1: both EMAs move every step; the step's new Ī and U are written beside the state
    (``spare``) and swapped in at commit, so a skipped step leaves no trace. The group scores are the
    latest S's sums, so S is formed only at the caller's ``fold`` (where the scores are read): at the
    other steps the pass only moves the EMAs. ``window`` > 1: each step's I goes into a running mean
    (state ``window``), and the window's end (the caller's ``fold``) folds the mean into the EMAs as
    one PLATON step; scores change only then.
    """

    name, title = "platon", "PLATON"

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95, window: int = 1):
        self.beta1, self.beta2, self.window = beta1, beta2, window

    @classmethod
    def from_config(cls, pruning) -> Platon:
        return cls(pruning.beta1, pruning.beta2, pruning.platon_window)

    @property
    def windowed(self) -> bool:
        return self.window > 1

    def bytes_per_weight(self) -> int:
        # per step: Ī, U and the step's new pair beside them; windowed: Ī, U, the window's mean and the
        # measured step's I
        return 4 * 4

    def new_state(self, numel, device):
        zeros = torch.zeros(numel, dtype=torch.float32, device=device)
        state = {"ema": zeros, "unc": zeros.clone()}
        if self.windowed:  # running mean of |w·g| over the window so far
            state["window"] = torch.zeros(numel, dtype=torch.float32, device=device)
        return state

    def measure(self, frag, weight, grad, state, spare):
        if self.windowed:
            ipt = torch.mul(weight.float(), grad.float()).abs_()  # I, fp32 (numel,); the window's mean takes it
            frag.zero_dead(ipt)
            return (ipt,)
        if not spare:  # allocated once, reused every step
            spare.update({k: torch.empty_like(state[k]) for k in ("ema", "unc")})
        frag.sums("ema_uncertainty", weight, grad, state, out=spare, betas=(self.beta1, self.beta2), sums=False)
        return ()

    def state_sums(self, frag, state):
        if self.windowed:  # the window's mean is not in the EMAs yet
            return None
        return frag.sums("product", state["ema"], state["unc"], masked=False)  # Ī, U ≥ 0: S = Ī·U

    def commit(self, frag, pending, state, spare, steps, fold):
        if not self.windowed:  # measure wrote the new EMAs beside the state: swap them in
            for k in ("ema", "unc"):
                state[k], spare[k] = spare[k], state[k]
            return self.state_sums(frag, state) if fold else None
        (ipt,) = pending
        state["window"].mul_(steps / (steps + 1)).add_(ipt, alpha=1 / (steps + 1))
        if not fold:
            return None
        ipt = state["window"]
        ema = {"ema": state["ema"], "unc": state["unc"]}  # the kernel with w = I, g = 1: |w·g| = I
        ones = torch.ones((), dtype=ipt.dtype, device=ipt.device).expand(ipt.shape)  # once per window
        sums = frag.sums("ema_uncertainty", ipt, ones, ema, betas=(self.beta1, self.beta2), masked=False)
        state["window"].zero_()
        return sums


METRICS: dict[str, type[Importance]] = {m.name: m for m in (Magnitude, Sensitivity, Platon)}


def from_config(pruning) -> Importance:
    """The metric ``pruning.metric`` names, with its settings (``pruning``: a ``config.PruningConfig``)."""
    return METRICS[pruning.metric].from_config(pruning)
