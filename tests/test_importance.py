"""The importance metrics as objects (homodistil.pruning.importance): the registry against the
config, and the memory each declares to the cost model against what the pruner allocates."""
import typing

import pytest
import torch

from homodistil import cost
from homodistil.config import PruningConfig, load_config
from homodistil.pruning.groups import Group, MaskPoint, Slice
from homodistil.pruning.importance import METRICS, Magnitude, Platon, Sensitivity, from_config
from homodistil.pruning.pruner import Pruner


def test_registry_holds_every_metric_the_config_accepts():
    accepted = typing.get_args(PruningConfig.model_fields["metric"].annotation)
    assert sorted(METRICS) == sorted(accepted) == ["magnitude", "platon", "sensitivity"]
    assert [type(from_config(PruningConfig(metric=m))) for m in ("magnitude", "sensitivity", "platon")] == \
        [Magnitude, Sensitivity, Platon]
    platon = from_config(PruningConfig(metric="platon", beta1=0.5, beta2=0.75, platon_window=3))
    assert (platon.beta1, platon.beta2, platon.window) == (0.5, 0.75, 3)
    assert [m.needs_grad for m in (Magnitude(), Sensitivity(), Platon())] == [False, True, True]


@pytest.mark.parametrize("importance", [Magnitude(), Sensitivity(), Platon(), Platon(window=3)],
                         ids=["magnitude", "sensitivity", "platon", "platon-window"])
def test_bytes_per_weight_is_what_the_pruner_keeps(importance):
    """After a measured, not yet committed step (the most a step holds): the metric's state, its spare
    buffers and every weight-sized measurement, in bytes per scored weight, are what the cost model
    charges (cost.importance_state)."""
    torch.manual_seed(0)
    group = Group("g", "ffn", 6, slices=(Slice("w", 0), Slice("v", 1)), points=(MaskPoint("m", "out"),))
    shapes = {"w": (6, 5), "v": (4, 6)}
    pruner = Pruner([group], lambda step: {"ffn": 3}, importance=importance)
    weights = {n: (torch.randn(s), torch.randn(s)) for n, s in shapes.items()}
    pruner.observe(weights)  # allocates the state and the buffers kept from step to step
    for name, (w, g) in weights.items():
        pruner.measure(name, shapes[name], 0, w.reshape(-1), g.reshape(-1))
    numel = sum(w.numel() for w, _ in weights.values())
    held = [t for st in (*pruner.state.values(), *pruner.spare.values()) for t in st.values()]
    sizes = {w.numel() for w, _ in weights.values()}  # 30, 24; row and column sums have 6, 5, 4 and 6
    held += [t for _, measured in pruner.pending.values() for t in measured if t.numel() in sizes]
    assert sum(t.numel() * t.element_size() for t in held) == importance.bytes_per_weight() * numel
    overrides = [f"pruning.metric={importance.name}",
                 f"pruning.platon_window={getattr(importance, 'window', 1)}", "pruning.sparsity.ffn=0.5"]
    assert cost.importance_state(load_config(None, overrides))[1] == importance.bytes_per_weight()
