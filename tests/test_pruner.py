"""Importance, masks and shrinking on plain tensors (no DeepSpeed)."""
import torch
from transformers import BertConfig

from homodistil.kernels.importance import importance_reference
from homodistil.pruning.importance import METRICS, Magnitude, Platon, Sensitivity
from homodistil.pruning.adapters import AdapterError, get_adapter, supported
from homodistil.pruning.groups import Group, MaskPoint, Slice, live_numel, shrink_tensors
from homodistil.pruning.pruner import Pruner, live_vectors, pieces, zero_dead
from homodistil.pruning.schedule import cubic_sparsity

import pytest
from conftest import assert_close_at_scale


def _group(size=8, blocks=2):
    return Group("g", "attention", size, slices=(Slice("w", 0), Slice("v", 1)), points=(MaskPoint("m", "out"),),
                 blocks=blocks)


def test_sensitivity_scores_are_group_sums_of_abs_w_times_g():
    torch.manual_seed(0)
    w, gw, v, gv = torch.randn(8, 3), torch.randn(8, 3), torch.randn(5, 8), torch.randn(5, 8)
    pruner = Pruner([_group()], lambda step: {"attention": 2}, importance=Sensitivity())
    pruner.observe({"w": (w, gw), "v": (v, gv)})
    pruner.observe({"w": (w, 3 * gw), "v": (v, 3 * gv)})
    one = (w * gw).abs().sum(1) + (v * gv).abs().sum(0)
    torch.testing.assert_close(pruner.scores["g"], (one + 3 * one) / 2)  # mean over the interval


def test_platon_state_matches_formula():
    torch.manual_seed(1)
    w, g1, g2 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    state = {"ema": torch.zeros(w.shape), "unc": torch.zeros(w.shape)}
    importance_reference(w, g1, "ema_uncertainty", state, 0.85, 0.95)
    row, col = importance_reference(w, g2, "ema_uncertainty", state, 0.85, 0.95)
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
    make = lambda window: Pruner([_group()], lambda step: {"attention": 2}, importance=Platon(window=window))  # noqa: E731
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
    torch.testing.assert_close(pruner.state["w"]["ema"], ema[0].flatten())  # state is flat: the rank's fragment
    assert pruner.state["w"]["window"].eq(0).all() and pruner.window_steps == 0
    # window 1 is per-step PLATON: the EMAs move every step; S's sums are formed only at a fold (where the
    # scores are read), and then are those of the latest step, as if every step had folded
    one, ref = make(1), {"w": {"ema": torch.zeros(w.shape), "unc": torch.zeros(w.shape)}, "v": {"ema": torch.zeros(v.shape), "unc": torch.zeros(v.shape)}}
    for k, (gw, gv) in enumerate(grads):
        one.observe({"w": (w, gw), "v": (v, gv)}, fold=k == 3)
        row, _ = importance_reference(w, gw, "ema_uncertainty", ref["w"], 0.85, 0.95)
        _, col = importance_reference(v, gv, "ema_uncertainty", ref["v"], 0.85, 0.95)
        if k == 2:
            assert one.scores["g"].eq(0).all()  # no fold yet: nothing summed
        if k == 3:  # bitwise the fused per-step reference's sums (what every-step folding kept): same ops, same order
            assert torch.equal(one.scores["g"], row + col)
    scores = one.scores["g"].clone()
    one.observe({"w": (w, grads[0][0]), "v": (v, grads[0][1])}, fold=False)
    assert torch.equal(one.scores["g"], scores)  # a step without a fold leaves the scores
    # a fold due at a step the optimizer skipped: the sums of the state as it stands (the last applied step's)
    row, _ = importance_reference(w, grads[0][0], "ema_uncertainty", ref["w"], 0.85, 0.95)
    _, col = importance_reference(v, grads[0][1], "ema_uncertainty", ref["v"], 0.85, 0.95)
    one.measure("w", tuple(w.shape), 0, w.reshape(-1), grads[1][0].reshape(-1))
    one.measure("v", tuple(v.shape), 0, v.reshape(-1), grads[1][1].reshape(-1))
    one.discard(fold=True)
    torch.testing.assert_close(one.scores["g"], row + col)
    torch.testing.assert_close(one.state["w"]["ema"], ref["w"]["ema"].flatten())  # the skipped step moved nothing


def test_masks_keep_top_scored_per_block_and_only_shrink():
    pruner = Pruner([_group()], lambda step: {"attention": 4 - round(4 * cubic_sparsity(step, 0, 2, 0.5))},
                    importance=Magnitude())
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
        return Pruner(groups, lambda step: adapter.kept(config, {k: cubic_sparsity(step, 0, 4, s) for k, s in
                                                                  sparsity.items()}), importance=METRICS[metric]())

    masked, shrunk = make(), make()
    alive = {g.name: torch.arange(g.size) for g in groups}  # the shrunk pruner's units, as original indices
    for step in range(1, 6):
        full = {n: (torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for n, s in shapes.items()}
        masked.observe(full)
        shrunk.observe({n: (shrink_tensors({n: w}, groups, alive)[n], shrink_tensors({n: g}, groups, alive)[n])
                        for n, (w, g) in full.items()})
        for g in groups:
            assert_close_at_scale(shrunk.scores[g.name], masked.scores[g.name][alive[g.name]],
                                      rtol=1e-5, msg=f"step {step}, {g.name}")
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
        return Pruner([_group()], lambda step: {"attention": 2}, importance=Platon())

    saved = pruner()
    saved.observe({"w": (w, g), "v": (v, gv)})
    sd, local = saved.state_dict(), saved.local_state_dict()
    assert {t.device.type for st in local["state"].values() for t in st.values()} == {"cpu"}
    resumed = pruner()
    resumed.load_state_dict(sd)
    resumed.load_local_state([local], {}, torch.device("meta"))
    assert {t.device.type for st in resumed.state.values() for t in st.values()} == {"meta"}
    assert torch.equal(resumed.masks["g"], saved.masks["g"]) and torch.equal(resumed.scores["g"], saved.scores["g"])


# ---------------------------------------------------------------------------------------------
# fragments: each rank scores its own flat range of a parameter
# ---------------------------------------------------------------------------------------------

def test_pieces_cover_a_flat_range_with_a_partial_row_whole_rows_and_a_partial_row():
    assert pieces((4, 5), 3, 14) == [(0, 0, 1, 3, 2), (2, 1, 2, 0, 5), (12, 3, 1, 0, 2)]
    assert pieces((4, 5), 5, 10) == [(0, 1, 2, 0, 5)]
    assert pieces((4, 5), 6, 2) == [(0, 1, 1, 1, 2)]
    assert pieces((7,), 2, 3) == [(0, 2, 3, 0, 1)]  # 1-D: a column
    assert pieces((4, 5), 20, 0) == []
    for start in range(21):  # every range of a (4, 5) tensor: its blocks tile it exactly
        for n in range(21 - start):
            covered = torch.zeros(4, 5, dtype=torch.int64)
            for offset, row, rows, col, cols in pieces((4, 5), start, n):
                covered[row:row + rows, col:col + cols] += 1
                assert row * 5 + col == start + offset
            assert covered.flatten().tolist() == [int(start <= i < start + n) for i in range(20)]


def test_zero_dead_zeroes_the_flat_slice_of_the_dead_entries():
    """Row and column live vectors (O(R + C)) zero exactly the dead entries of any fragment."""
    units = {0: torch.tensor([True, False, True, True]), 1: torch.tensor([True, True, False, True, True])}
    full = (units[0].view(-1, 1) & units[1].view(1, -1)).flatten()
    live = live_vectors(units, (4, 5), "cpu")
    assert live[0].shape == (4,) and live[1].shape == (5,) and live[0].dtype == torch.float32
    for start, n in ((0, 20), (3, 14), (7, 1), (12, 8)):
        values = torch.arange(1.0, n + 1)
        zero_dead(values, (4, 5), start, live)
        assert torch.equal(values != 0, full[start:start + n])


@pytest.mark.parametrize("metric,window", [("magnitude", 1), ("sensitivity", 1), ("platon", 1), ("platon", 2)])
def test_fragments_split_among_ranks_give_the_whole_tensors_scores_and_reshard_after_a_shrink(metric, window):
    """Three simulated ranks measure uneven flat ranges (starting mid-row); their partial sums,
    added as the all-reduce adds them, give the scores and masks of one pruner that sees whole
    tensors, through a mask update (dead entries) and a shrink after which the PLATON state is
    resharded to another partitioning."""
    torch.manual_seed(3)
    shapes = {"w": (8, 3), "v": (5, 8)}

    def make():
        return Pruner([_group()], lambda step: {"attention": 4 - round(4 * cubic_sparsity(step, 0, 4, 0.5))},
                      importance=Platon(window=window) if metric == "platon" else METRICS[metric]())

    def split(shape, cuts):
        n = shape[0] * shape[1]
        bounds = [0, *cuts(n), n]
        return list(zip(bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]))

    whole, ranks = make(), [make() for _ in range(3)]
    ranges = {name: split(shape, lambda n: (n // 3 + 1, 2 * n // 3 - 1)) for name, shape in shapes.items()}
    for step in range(1, 5):
        full = {n: (torch.randn(s), torch.randn(s)) for n, s in shapes.items()}
        whole.observe(full, fold=step % window == 0)
        for r, pruner in enumerate(ranks):
            for name, (w, g) in full.items():
                start, n = ranges[name][r]
                pruner.measure(name, tuple(w.shape), start, w.flatten()[start:start + n], g.flatten()[start:start + n])
        _commit_together(ranks, step % window == 0)
        for g in whole.groups:
            for pruner in ranks:
                assert_close_at_scale(pruner.scores[g.name], whole.scores[g.name], rtol=1e-5)
        changed = whole.update_masks(step)
        assert all(p.update_masks(step) == changed for p in ranks)
        assert all(torch.equal(p.masks["g"], whole.masks["g"]) for p in ranks)
        if step == 2:  # shrink; the new partitioning starts at other offsets
            new = [_group(size=int(whole.masks["g"].sum()))]
            keep = whole.shrink(new)
            for pruner in ranks:
                assert torch.equal(pruner.shrink(new)["g"], keep["g"])
            shapes = {"w": (int(keep["g"].numel()), 3), "v": (5, int(keep["g"].numel()))}
            ranges = {name: split(shape, lambda n: (2, n - 5)) for name, shape in shapes.items()}
            _reshard_together(ranks, ranges)
            for name in whole.state:
                for key, t in whole.state[name].items():
                    assert torch.equal(torch.cat([p.state[name][key] for p in ranks]), t), (name, key)


def _together(ranks, work):
    """Run ``work(rank, pruner, reduce)`` for each simulated rank in its own thread; ``reduce`` sums a
    tensor over the ranks in place, as ``dist.all_reduce`` does (each call is one collective)."""
    import threading

    barrier, slots = threading.Barrier(len(ranks)), [None] * len(ranks)

    def reduce_for(r):
        def reduce(t):
            slots[r] = t.clone()
            barrier.wait()
            t.copy_(sum(slots))
            barrier.wait()
        return reduce

    errors = []

    def run(r, pruner):
        try:
            work(r, pruner, reduce_for(r))
        except Exception as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r, p)) for r, p in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _commit_together(ranks, fold):
    _together(ranks, lambda r, pruner, reduce: pruner.commit(fold, reduce=reduce))


def _reshard_together(ranks, ranges):
    def gather(reduce):
        def full(local, start, numel):
            out = torch.zeros(numel)
            out[start:start + local.numel()] = local
            reduce(out)
            return out
        return full

    _together(ranks, lambda r, pruner, reduce: pruner.reshard(gather(reduce), {n: rs[r] for n, rs in ranges.items()}))


def test_a_saved_partitioned_state_loads_into_another_partitioning():
    torch.manual_seed(4)
    shape = (5, 8)
    ema = torch.randn(40)
    saved = [{"shapes": {"w": shape}, "fragments": {"w": (a, b - a)}, "state": {"w": {"ema": ema[a:b]}}}
             for a, b in ((0, 13), (13, 27), (27, 40))]
    pruner = Pruner([Group("g", "attention", 5, slices=(Slice("w", 0),), points=(MaskPoint("m", "out"),))],
                    lambda step: {"attention": 2}, importance=Platon())
    pruner.load_state_dict({**pruner.state_dict(), "partitioned": True})
    pruner.load_local_state(iter(saved), {"w": (9, 20)}, "cpu")
    assert torch.equal(pruner.state["w"]["ema"], ema[9:29]) and pruner.fragments["w"] == (9, 20)


def test_masked_linear_is_the_shrunk_linear_scattered_back():
    """F.linear × mask: masked outputs (bias included) and their weight and bias gradients are exactly 0, the
    live ones are the shrunk layer's (to rounding), at an odd shape."""
    from homodistil.pruning.masked import masked_linear

    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(5, 3, 7, generator=gen), torch.randn(11, 7, generator=gen), torch.randn(11, generator=gen)
    keep = torch.rand(11, generator=gen) < 0.6
    live = keep.nonzero().squeeze(1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = masked_linear(*leaves, keep)
    y.sum().backward()
    shrunk = torch.nn.functional.linear(x, w[live], b[live])
    assert y.shape == (5, 3, 11) and y[..., ~keep].eq(0).all()
    # the same dot products, but a GEMM of 11 outputs and one of 6 may block (and so sum) them in another order
    assert_close_at_scale(y[..., live], shrunk, rtol=1e-6)
    assert leaves[1].grad[~keep].eq(0).all() and leaves[2].grad[~keep].eq(0).all()
