"""Importance, masks and shrinking on plain tensors (no DeepSpeed)."""
import torch
from transformers import BertConfig

from homodistil.kernels.importance import importance_reference, init_state
from homodistil.pruning.adapters import AdapterError, get_adapter, supported
from homodistil.pruning.groups import Group, MaskPoint, Slice, live_numel, shrink_tensors
from homodistil.pruning.pruner import Pruner

import pytest


def _group(size=8, blocks=2):
    return Group("g", "attention", size, slices=(Slice("w", 0), Slice("v", 1)), points=(MaskPoint("m", "out"),),
                 blocks=blocks)


def test_sensitivity_scores_are_group_sums_of_abs_w_times_g():
    torch.manual_seed(0)
    w, gw, v, gv = torch.randn(8, 3), torch.randn(8, 3), torch.randn(5, 8), torch.randn(5, 8)
    pruner = Pruner([_group()], lambda s: {"attention": 2}, metric="sensitivity", s_final={"attention": 0.5},
                    t_i=0, t_f=4)
    pruner.observe({"w": (w, gw), "v": (v, gv)})
    pruner.observe({"w": (w, 3 * gw), "v": (v, 3 * gv)})
    one = (w * gw).abs().sum(1) + (v * gv).abs().sum(0)
    torch.testing.assert_close(pruner.scores["g"], (one + 3 * one) / 2)  # mean over the interval


def test_platon_state_matches_formula():
    torch.manual_seed(1)
    w, g1, g2 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    state = init_state(w, "platon")
    importance_reference(w, g1, "platon", state, 0.85, 0.95)
    row, col = importance_reference(w, g2, "platon", state, 0.85, 0.95)
    i1, i2 = (w * g1).abs(), (w * g2).abs()
    ema1 = 0.15 * i1
    unc1 = 0.05 * (i1 - ema1).abs()
    ema2 = 0.85 * ema1 + 0.15 * i2
    unc2 = 0.95 * unc1 + 0.05 * (i2 - ema2).abs()
    torch.testing.assert_close(row, (ema2 * unc2).sum(1))
    torch.testing.assert_close(col, (ema2 * unc2).sum(0))


def test_platon_window_folds_the_window_mean_once_per_window():
    """pruning.platon_window: |w·g| averaged over the window, the EMAs updated once per window (by hand)."""
    torch.manual_seed(2)
    w, v = torch.randn(8, 3), torch.randn(5, 8)
    grads = [(torch.randn(8, 3), torch.randn(5, 8)) for _ in range(5)]
    make = lambda window: Pruner([_group()], lambda s: {"attention": 2}, metric="platon",  # noqa: E731
                                 s_final={"attention": 0.5}, t_i=0, t_f=9, platon_window=window)
    pruner = make(3)
    for k, (gw, gv) in enumerate(grads):  # windows: steps 1-3, then 4-5 (a partial window, folded early)
        pruner.observe({"w": (w, gw), "v": (v, gv)}, fold=k in (2, 4))
        if k == 0:
            assert pruner.scores["g"].eq(0).all()  # nothing folded yet: no score
    i = [((w * gw).abs(), (v * gv).abs()) for gw, gv in grads]  # I per step, per tensor
    means = [[sum(t[j] for t in i[a:b]) / (b - a) for j in (0, 1)] for a, b in ((0, 3), (3, 5))]
    ema = [0.15 * m for m in means[0]]
    unc = [0.05 * (m - e).abs() for m, e in zip(means[0], ema)]
    ema = [0.85 * e + 0.15 * m for e, m in zip(ema, means[1])]
    unc = [0.95 * u + 0.05 * (m - e).abs() for u, m, e in zip(unc, means[1], ema)]
    torch.testing.assert_close(pruner.scores["g"], (ema[0] * unc[0]).sum(1) + (ema[1] * unc[1]).sum(0))
    torch.testing.assert_close(pruner.state["w"]["ema"], ema[0])
    assert pruner.state["w"]["window"].eq(0).all() and pruner.window_steps == 0
    # window 1 is today's per-step PLATON, whatever fold says
    one, ref = make(1), {"w": init_state(w, "platon"), "v": init_state(v, "platon")}
    for gw, gv in grads:
        one.observe({"w": (w, gw), "v": (v, gv)}, fold=False)
        row, _ = importance_reference(w, gw, "platon", ref["w"], 0.85, 0.95)
        _, col = importance_reference(v, gv, "platon", ref["v"], 0.85, 0.95)
    torch.testing.assert_close(one.scores["g"], row + col)


def test_masks_keep_top_scored_per_block_and_only_shrink():
    pruner = Pruner([_group()], lambda s: {"attention": 4 - round(4 * s["attention"])}, metric="magnitude",
                    s_final={"attention": 0.5}, t_i=0, t_f=2)
    pruner.scores["g"] = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 9.0, 0.1])
    assert pruner.update_masks(1)  # s = 0.5·(1 − 0.125) = 0.4375 -> keep 4 − 2 = 2 per head
    assert pruner.masks["g"].tolist() == [True, False, True, False, False, True, True, False]
    pruner.scores["g"] = torch.tensor([0.0, 9.0, 9.0, 9.0, 9.0, 9.0, 0.0, 9.0])
    pruner.update_masks(2)  # s = 0.5 -> still 2 per head: masked units never come back
    assert pruner.masks["g"].tolist() == [True, False, True, False, False, True, True, False]


def test_shrink_tensors_slices_every_coupled_dim():
    g = _group()
    w, v = torch.arange(24.0).view(8, 3), torch.arange(40.0).view(5, 8)
    keep = {"g": torch.tensor([0, 2, 5, 6])}
    out = shrink_tensors({"w": w, "v": v, "other": torch.ones(2)}, [g], keep)
    assert torch.equal(out["w"], w[[0, 2, 5, 6]]) and torch.equal(out["v"], v[:, [0, 2, 5, 6]])
    assert torch.equal(out["other"], torch.ones(2))
    with pytest.raises(AssertionError):
        shrink_tensors({"w": torch.ones(7, 3)}, [g], keep)  # shape assert: wrong unit count


def test_live_numel_counts_kept_slices():
    g = _group()
    masks = {"g": torch.tensor([1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)}
    assert live_numel({"w": (8, 3), "v": (5, 8), "x": (2,)}, [g], masks) == 4 * 3 + 5 * 4 + 2


def test_bert_groups_cover_every_parameter_dimension():
    from transformers import BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24)
    model = BertForMaskedLM(cfg)
    groups = get_adapter("bert").groups(cfg)
    params = dict(model.named_parameters())
    sliced = {(s.param, s.dim) for g in groups for s in g.slices}
    for name, p in params.items():
        for dim, size in enumerate(p.shape):
            if size in (16, 24):  # every hidden-width and FFN-width dimension is pruned
                assert (name, dim) in sliced, (name, dim)
    for g in groups:
        for s in g.slices:
            assert params[s.param].shape[s.dim] == g.size, (g.name, s)


def test_bert_rejects_untied_attention_and_hidden_sparsity():
    cfg = BertConfig(hidden_size=16, num_attention_heads=4)
    with pytest.raises(AdapterError, match="must equal pruning.sparsity.hidden"):
        get_adapter("bert").check_targets(cfg, {"ffn": 0.5, "attention": 0.5, "hidden": 0.25})


def test_unknown_model_type_lists_supported():
    with pytest.raises(AdapterError, match="no adapter for model_type 'mamba'.*bert"):
        get_adapter("mamba")
    assert "bert" in supported()


@pytest.mark.parametrize("metric", ["magnitude", "sensitivity", "platon"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama-gqa"])
def test_masked_entries_score_as_if_shrunk(family, metric):
    """A pruner that shrinks after every mask update and one that only masks see the same
    weights and gradients (random everywhere, dead entries included): they keep the same units
    and give the kept units the same scores, so how often a run shrinks cannot change its masks."""
    from test_adapters import _config

    adapter, config, sparsity = _config(family)
    groups = adapter.groups(config)
    gen = torch.Generator().manual_seed(0)
    shapes = {n: p.shape for n, p in adapter.build(config, config).named_parameters()}

    def make():
        return Pruner(groups, lambda s: adapter.kept(config, s), metric=metric, s_final=sparsity, t_i=0, t_f=4)

    masked, shrunk = make(), make()
    alive = {g.name: torch.arange(g.size) for g in groups}  # the shrunk pruner's units, as original indices
    for step in range(1, 6):
        full = {n: (torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for n, s in shapes.items()}
        masked.observe(full)
        shrunk.observe({n: (shrink_tensors({n: w}, groups, alive)[n], shrink_tensors({n: g}, groups, alive)[n])
                        for n, (w, g) in full.items()})
        for g in groups:
            torch.testing.assert_close(shrunk.scores[g.name], masked.scores[g.name][alive[g.name]],
                                       rtol=1e-5, atol=0, msg=f"step {step}, {g.name}")
        assert masked.update_masks(step) == shrunk.update_masks(step)
        if not shrunk.is_dense():
            kept = {g.kind: int(shrunk.masks[g.name].view(g.blocks, -1)[0].sum()) for g in shrunk.groups}
            keep = shrunk.shrink(adapter.groups(adapter.shrunk_config(config, kept)))
            alive = {name: alive[name][idx] for name, idx in keep.items()}
        for g in groups:
            assert torch.equal(masked.masks[g.name].nonzero().squeeze(1), alive[g.name]), (step, g.name)
    assert any(a.numel() < g.size for g, a in zip(groups, alive.values()))  # it pruned


def test_resumed_importance_state_lives_where_it_is_asked_to():
    """A checkpoint holds the PLATON state on CPU; resuming puts it on the run's device (the
    meta device stands in for a GPU here), so the next importance step finds it beside the
    gradients instead of handing CPU state to a CUDA kernel."""
    torch.manual_seed(0)
    w, g, v, gv = torch.randn(8, 3), torch.randn(8, 3), torch.randn(5, 8), torch.randn(5, 8)

    def pruner():
        return Pruner([_group()], lambda s: {"attention": 2}, metric="platon", s_final={"attention": 0.5},
                      t_i=0, t_f=4)

    saved = pruner()
    saved.observe({"w": (w, g), "v": (v, gv)})
    sd = saved.state_dict()
    assert {t.device.type for st in sd["state"].values() for t in st.values()} == {"cpu"}
    resumed = pruner()
    resumed.load_state_dict(sd, torch.device("meta"))
    assert {t.device.type for st in resumed.state.values() for t in st.values()} == {"meta"}
    assert torch.equal(resumed.masks["g"], saved.masks["g"]) and torch.equal(resumed.scores["g"], saved.scores["g"])
