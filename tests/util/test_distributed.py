"""saetool.util.distributed's pure helpers: how items are split across ranks (case D2), and member shares balanced by cost
against a brute-force search over every contiguous split."""

import itertools
import random

import pytest

from saetool.util.distributed import partition_by_cost, split_evenly


def test_d2_split_evenly_sizes():
    assert [len(split_evenly(17, 8, r)) for r in range(8)] == [3, 2, 2, 2, 2, 2, 2, 2]
    assert [len(split_evenly(3, 4, r)) for r in range(4)] == [1, 1, 1, 0]
    assert [i for r in range(8) for i in split_evenly(17, 8, r)] == list(range(17))


def test_partition_by_cost_hand_cases():
    # two hooks of 4 members each, equal costs: each rank holds one whole hook
    assert partition_by_cost([5] * 8, 2) == [range(4), range(4, 8)]
    # members 4x dearer on the first hook (d_in twice as wide): 2 of them on rank 0, the rest with the cheap ones
    assert partition_by_cost([4, 4, 4, 4, 1, 1, 1, 1], 2) == [range(2), range(2, 8)]  # loads 8 and 12: optimal
    assert partition_by_cost([1, 1, 1, 1, 10], 2) == [range(4), range(4, 5)]
    assert partition_by_cost([10, 1, 1], 3) == [range(1), range(1, 2), range(2, 3)]  # every rank gets one
    assert partition_by_cost([1] * 5, 2) == [range(2), range(2, 5)]
    assert [len(r) for r in partition_by_cost([1] * 17, 8)] == [2, 2, 2, 2, 3, 2, 2, 2]


def test_partition_by_cost_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 9)
        w = rng.randint(1, n)
        costs = [rng.randint(1, 12) for _ in range(n)]
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n), strict=True))
                   for cuts in itertools.combinations(range(1, n), w - 1))
        shares = partition_by_cost(costs, w)
        assert [i for r in shares for i in r] == list(range(n)) and all(len(r) for r in shares)
        assert max(sum(costs[i] for i in r) for r in shares) == best, (costs, w, shares)


def test_partition_by_cost_refuses_impossible_splits():
    with pytest.raises(ValueError, match="3 items cannot give each of 4 ranks one"):
        partition_by_cost([1, 1, 1], 4)
    with pytest.raises(ValueError, match="positive integers"):
        partition_by_cost([1, 0], 2)
