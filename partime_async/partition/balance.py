"""The optimal contiguous split: given each unit's cost (per stage's device), the balance that
minimises the costliest stage. A greedy split can be far off when costs are uneven."""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast


def min_max_partition(costs: Sequence[float] | Sequence[Sequence[float]], n_stages: int) -> list[int]:
    """The contiguous partition into ``n_stages`` non-empty parts minimising the costliest part.

    ``costs`` is either one cost per layer, or one such row per stage (heterogeneous devices:
    ``costs[k][i]`` is layer i's cost on stage k's device). Ties go to the earliest split.
    Exact dynamic programme, O(n_stages * n_layers^2).
    """
    # (the check on the first entry tells the two forms apart; the types cannot narrow on it)
    if costs and isinstance(costs[0], (list, tuple)):
        rows = [list(r) for r in cast("Sequence[Sequence[float]]", costs)]
    else:
        rows = [list(cast("Sequence[float]", costs))] * n_stages
    n = len(rows[0])
    if len(rows) != n_stages or any(len(r) != n for r in rows):
        raise ValueError("costs must have one row per stage, each with one cost per layer")
    if n_stages < 1 or n < n_stages:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages; use at most {n} devices")
    prefix = []
    for row in rows:
        acc = [0.0]
        for c in row:
            acc.append(acc[-1] + c)
        prefix.append(acc)
    inf = float("inf")
    # best[k][j]: least max-cost of putting layers [0, j) on stages 0..k; cut[k][j]: start of stage k
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        best[0][j] = prefix[0][j]
    for k in range(1, n_stages):
        p = prefix[k]
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                value = max(best[k - 1][i], p[j] - p[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    balance, j = [], n
    for k in range(n_stages - 1, 0, -1):
        i = cut[k][j]
        balance.append(j - i)
        j = i
    balance.append(j)
    return balance[::-1]
