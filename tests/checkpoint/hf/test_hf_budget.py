"""The conversion memory budget: sizes, accounting, and refusing what cannot fit."""

from __future__ import annotations

import pytest

from megatron_r1.checkpoint.hf.budget import MemoryBudget, parse_size


def test_hf_budget_parses_sizes() -> None:
    assert parse_size("8GiB") == 8 * 1024**3
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("4096") == 4096
    assert parse_size(17) == 17
    with pytest.raises(ValueError, match=r"'8 parsecs' is not a size"):
        parse_size("8 parsecs")


def test_hf_budget_accounts_peak_and_refuses_oversized_units() -> None:
    budget = MemoryBudget(100)
    with budget.hold(60, "a"), budget.hold(40, "b"):
        assert budget.current == 100
    assert budget.current == 0 and budget.peak == 100
    with pytest.raises(ValueError, match=r"tensor X needs 101 B at once, more than the memory "
                                         r"budget of 100 B; raise --memory-budget"):
        budget.check_fits(101, "tensor X")
    with budget.hold(60, "a"), pytest.raises(RuntimeError, match="memory budget overrun: b"):
        budget.hold(41, "b").__enter__()
