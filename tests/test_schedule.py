import pytest

from homodistil.pruning.schedule import cubic_sparsity, kept_units


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
