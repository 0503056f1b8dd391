import pytest

from homodistil.pruning.schedule import cubic_sparsity, kept_units, largest_mask_interval, update_drops


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
