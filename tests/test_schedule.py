import random

import pytest

from homodistil.config import load_config
from homodistil.pruning.schedule import (PruningSchedule, aligned_quantum, budget_cadence, cubic_sparsity, kept_units,
                                         largest_mask_interval, update_drops)


@pytest.mark.parametrize("t_i,t_f,s", [(0, 10, 0.5), (7, 31, 0.9), (100, 28000, 0.75)])
def test_cubic_schedule_bounds_and_monotone(t_i, t_f, s):
    values = [cubic_sparsity(t, t_i, t_f, s) for t in range(0, t_f + 20)]
    assert all(v == 0.0 for v in values[: t_i + 1])  # 0 before t_i, and exactly 0 at t_i
    assert all(v == s for v in values[t_f:])  # s_final at and after t_f
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone
    assert all(0.0 <= v <= s for v in values)


def test_cubic_schedule_formula():
    # midpoint: s · (1 − (1 − 0.5)³) = 0.5 · 0.875
    assert cubic_sparsity(5, 0, 10, 0.5) == pytest.approx(0.4375)
    assert cubic_sparsity(12, 10, 20, 0.8) == pytest.approx(0.8 * (1 - 0.8**3))


def test_cubic_schedule_rejects_empty_window():
    with pytest.raises(ValueError):
        cubic_sparsity(0, 5, 5, 0.5)


def test_kept_units():
    assert kept_units(3072, 0.5) == 1536
    assert kept_units(64, 0.0) == 64
    assert kept_units(4, 0.99) == 1  # never zero units


def test_update_drops_follow_the_recipes_cadence():
    # updates at 3, 6, 9 (= t_f): 0 (before t_i), then the schedule's levels
    drops = update_drops(4, 9, 0.5, 3)
    levels = [cubic_sparsity(t, 4, 9, 0.5) for t in (3, 6, 9)]
    assert drops == pytest.approx([0.0, levels[1], levels[2] - levels[1]])
    assert sum(update_drops(5, 250, 0.5, 7)) == pytest.approx(0.5)  # t_f not a multiple: its own update


@pytest.mark.parametrize("t_i,t_f,s,expected", [(5, 250, 0.5, 3), (5, 500, 0.5, 6), (5, 2000, 0.5, 27)])
def test_largest_mask_interval_is_the_largest_within_the_drop(t_i, t_f, s, expected):
    m = largest_mask_interval(t_i, t_f, s, 0.02)
    assert m == expected
    assert max(update_drops(t_i, t_f, s, m)) <= 0.02
    assert all(max(update_drops(t_i, t_f, s, k)) > 0.02 for k in range(m + 1, t_f + 1))
    # the steepest update is the one after t_i: about 3·s·m/(t_f − t_i)
    assert max(update_drops(t_i, t_f, s, m)) == pytest.approx(3 * s * m / (t_f - t_i), rel=0.05)


def test_largest_mask_interval_is_1_when_nothing_fits():
    assert largest_mask_interval(5, 30, 0.5, 0.02) == 1  # one step alone adds ~6%
    assert max(update_drops(5, 30, 0.5, 1)) > 0.05


# ---------------------------------------------------------------------------------------------
# Aligned widths (pruning.width_multiple)
# ---------------------------------------------------------------------------------------------
def test_kept_units_rounds_the_removed_units_to_the_quantum():
    assert kept_units(3072, 846 / 3072, 64) == 2240  # 846 removed -> 13·64 = 832 (2226 unaligned)
    assert kept_units(3072, 0.78515625, 64) == 640  # 2412 -> 38·64 = 2432 (660 unaligned)
    assert kept_units(64, 0.99, 8) == 8  # at least one quantum
    # quantum 1 is the former rule, bit for bit
    for size in (1, 7, 40, 64, 3072, 14336):
        for s in [i / 64 for i in range(64)] + [0.29, 0.4375, 0.99]:
            assert kept_units(size, s) == max(1, size - int(round(size * s))), (size, s)


@pytest.mark.parametrize("units,blocks,multiple,final,expected", [
    (3072, 1, 64, 0.27, 64),  # HomoBERT FFN
    (64, 12, 8, 0.6875, 2),  # BERT-base heads: lcm(12, 8) / 12
    (64, 9, 8, 0.25, 8),  # SmolLM2 hidden per head: lcm(9, 8) / 9 = 8, 64 units -> 48
    (128, 32, 8, 0.25, 1),  # Llama-3-8B hidden per head: 32 heads already make it a multiple of 8
    (64, 1, 64, 0.5, 32),  # a tiny FFN: 64 would be all or nothing, 32 keeps the target of 32
    (48, 1, 64, 0.5, 16),  # 64 and 32 do not divide 48; 16 does and is below the target of 24
    (37, 1, 64, 0.5, 1),  # prime: unaligned
    (40, 1, 64, 0.99, 1),  # a target of 1 unit
    (10, 3, 8, 0.5, 2),  # 3 heads of 10: 8 and 4 (steps 8, 4) do not divide 10, 2 (lcm 6 / 3) does
    (3072, 1, 1, 0.5, 1),  # width_multiple 1: unaligned
    (3072, 1, 48, 0.5, 48),  # not a power of two: 48, then 24, 12, 6, 3, 1
])
def test_aligned_quantum(units, blocks, multiple, final, expected):
    assert aligned_quantum(units, blocks, multiple, final) == expected


def _schedule(overrides: list[str], teacher: str) -> tuple[PruningSchedule, object]:
    """The schedule of a run of ``teacher`` (a known hub id: its config, no download) and the teacher config."""
    from homodistil.cost import teacher_hf_config

    cfg = load_config(None, [f"model.teacher={teacher}", *overrides])
    config, adapter = teacher_hf_config(cfg)
    return PruningSchedule.for_run(cfg, adapter, config), config


@pytest.mark.parametrize("teacher,overrides,target,hidden_step", [
    # BERT-base to the paper's unaligned HomoBERT-base FFN (2226) and a hidden of 0.3 (537.6): 12 heads, lcm 24
    ("bert-base-uncased", ["pruning.sparsity.ffn=0.275390625", "pruning.sparsity.attention=0.3",
                           "pruning.sparsity.hidden=0.3"], {"ffn": 2226, "hidden": 537.6}, 24),
    # Llama-3-8B at 0.3 (FFN 10035.2, hidden 2867.2): 32 heads, lcm 32
    ("meta-llama/Meta-Llama-3-8B", ["pruning.sparsity.ffn=0.3", "pruning.sparsity.attention=0",
                                    "pruning.sparsity.hidden=0.3"], {"ffn": 10035.2, "hidden": 2867.2}, 32),
])
def test_kept_widths_at_every_mask_update_are_multiples_and_end_within_one_of_the_target(teacher, overrides, target,
                                                                                        hidden_step):
    schedule, config = _schedule(["trainer.max_steps=1000", "pruning.t_i=10", "pruning.t_f=700",
                                  "pruning.mask_interval=7", *overrides], teacher)
    heads = config.num_attention_heads
    updates = [s for s in range(1, 1001) if schedule.masks(s)]
    assert len(updates) == 99 and updates[-1] == 700  # 14, 21, …, 700 (7 is not past t_i = 10)
    widths = [schedule.kept(s) for s in updates]
    hidden = [w["hidden"] for w in widths]
    assert all(w["ffn"] % 64 == 0 for w in widths) and all(h % hidden_step == 0 for h in hidden)
    assert hidden_step % 8 == 0 and hidden_step % heads == 0
    assert len({w["ffn"] for w in widths}) > 10 and len(set(hidden)) > 3  # it did move, step by step
    final = widths[-1]
    # rounded to the nearest multiple: within half of one
    assert abs(final["ffn"] - target["ffn"]) <= 64 / 2 and abs(final["hidden"] - target["hidden"]) <= hidden_step / 2
    assert final == schedule.widths(schedule.final) == schedule.segments()[-1][2]


# ---------------------------------------------------------------------------------------------
# PruningSchedule: the recipe's former inline rule, the planner's segments
# ---------------------------------------------------------------------------------------------
def _former_rule(schedule: PruningSchedule) -> tuple[list[int], list[int], list[int], list[int]]:
    """The steps that Recipe.train scored, folded, masked (where a mask could change) and shrank at before the
    schedule owned them, with its inline arithmetic and a pruner's masks simulated (each mask update keeps
    ``kept(step)`` per block; a shrink happens where the masks are not dense). Folds: the later rule, which
    adds no fold at window 1 where no mask update reads the scores."""
    p = schedule
    scored, folded, masked, shrunk = [], [], [], []
    live = shrunk_to = p.kept(0)
    for step in range(p.max_steps):  # ``step``: Recipe.step before the optimizer step
        if p.prunes and step < p.t_f and step + 1 >= max(p.t_i - p.mask_interval, p.score_after + 1):
            scored.append(step + 1)
        step += 1
        mask_step = p.prunes and p.t_i < step <= p.t_f and (step % p.mask_interval == 0 or step == p.t_f)
        if mask_step or step == p.t_f or (p.platon_window > 1 and step % p.platon_window == 0):
            folded.append(step)  # since PLATON forms S only where it is read: every step at window 1 before
        if (step % p.mask_interval == 0 or step == p.t_f) and p.widths(p.sparsity(step)) != live:
            masked.append(step)
            live = p.widths(p.sparsity(step))
        if (step % p.shrink_interval == 0 or step >= p.t_f) and live != shrunk_to:
            shrunk.append(step)
            shrunk_to = live
    return scored, folded, masked, shrunk


@pytest.mark.parametrize("seed", range(12))
def test_schedule_is_the_recipes_former_rule(seed):
    """Random schedules (and one-shot, scratch, no-sparsity runs): the decisions equal the recipe's former inline
    arithmetic step for step, and the planner no longer counts a shrink before t_i, as its own rule did."""
    rng = random.Random(seed)
    t_i = rng.choice([0, 0, 3, 10])
    t_f = t_i + rng.randint(1, 40)
    s = rng.choice([0.0, 0.3, 0.5, 0.9])
    overrides = [f"trainer.max_steps={t_f + rng.randint(0, 20)}", f"pruning.t_i={t_i}", f"pruning.t_f={t_f}",
                 f"pruning.mask_interval={rng.randint(1, 7)}", f"pruning.shrink_interval={rng.randint(1, 12)}",
                 f"pruning.score_after={rng.randint(0, t_i)}", f"pruning.platon_window={rng.randint(1, 4)}",
                 f"pruning.sparsity.ffn={s}", f"pruning.sparsity.attention={s}", f"pruning.sparsity.hidden={s}",
                 "model.tiny.hidden_size=48", "model.tiny.intermediate_size=96",
                 *rng.choice([[], [], ["pruning.schedule=oneshot"], ["model.init=scratch"]])]
    schedule, _ = _schedule(overrides, "tiny")
    scored, folded, masked, shrunk = _former_rule(schedule)
    steps = range(1, schedule.max_steps + 1)
    assert [t for t in steps if schedule.scores(t)] == scored
    assert [t for t in steps if schedule.folds(t)] == folded
    assert set(masked) <= {t for t in steps if schedule.masks(t)}  # it also asks where nothing changes
    assert [t for t in steps if schedule.shrinks(t)] == list(schedule.shrunk) == shrunk
    assert all(t_i < t <= t_f for t in shrunk)
    segments = schedule.segments()
    assert segments[0][0] == 0 and segments[-1][1] == schedule.max_steps
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))
    # what a checkpoint saved after step t holds: the widths the steps after t train at
    assert [schedule.widths_after(t) for t in range(schedule.max_steps)] == [
        width for start, end, width in segments for _ in range(start, end)]
    if schedule.oneshot:
        assert segments == [(0, schedule.max_steps, schedule.widths(schedule.final))] and not shrunk


def test_budget_cadence_is_the_largest_mask_interval_and_a_twentieth_of_the_window():
    assert budget_cadence(5, 250, 0.5, 0.02) == (3, 12)
    assert budget_cadence(5, 150, 0.5, 0.02) == (1, 7)  # configs/demo.yaml
    assert budget_cadence(1, 3, 0.5, 0.4) == (1, 1)
