"""The memory bank's two operations: greedy k-center coreset selection and nearest-neighbour search.

Both use squared Euclidean distances computed as |a|^2 - 2 a.b + |b|^2 in chunks, so memory stays bounded
and the search exports to ONNX (matmul, min, top-k) without a custom operator.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per chunk (64 MiB of float32)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 (rounding)."""
    d = a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]
    return d.clamp_min(0)


def nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k) and indices (n, k) of each query's ``k`` nearest bank rows, nearest first.

    The rows are found with the expanded form (one matrix product per chunk), their distances are then
    computed directly (exact to float32 rounding of the difference, also for near-duplicates).

    ``query_owner`` (n,) and ``bank_owner`` (m,), optional: a query never uses a bank row of the same owner
    (leave-one-out: the training image a feature came from).
    """
    if len(bank) < k:
        raise ValueError(f"the memory bank has {len(bank)} rows, fewer than the {k} neighbours asked for")

    def chunk(q: torch.Tensor, owner: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        d = squared_distances(q, bank)
        if owner is not None:
            d = d.masked_fill(owner[:, None] == bank_owner[None], math.inf)
        i = torch.topk(d, k, dim=1, largest=False).indices
        # the chosen rows' distances again, directly: the expansion above loses digits for close pairs
        # clamp: no infinite gradient at a zero distance (a training patch that is itself in the bank)
        return (q[:, None, :] - bank[i]).pow(2).sum(-1).clamp_min(1e-12).sqrt(), i

    if torch.jit.is_tracing():  # ONNX export: no Python loop over the batch, so any batch size holds
        return chunk(queries, query_owner)
    rows = max(1, CHUNK_ELEMENTS // max(1, len(bank)))
    parts = [
        chunk(queries[s : s + rows], None if query_owner is None else query_owner[s : s + rows])
        for s in range(0, len(queries), rows)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def greedy_coreset(
    features: torch.Tensor, n: int, projection_dim: int | None = 128, seed: int = 0
) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center selection (Roth et al. 2022, Alg. 1).

    Start at a seeded random row; then repeatedly add the row farthest from everything chosen so far
    (Euclidean). As in the paper, distances are computed after a random linear projection to
    ``projection_dim`` dimensions (Johnson-Lindenstrauss; None or >= D: none), which makes each step cheap.
    """
    if not 0 < n <= len(features):
        raise ValueError(f"coreset size {n} must be in [1, {len(features)}]")
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    start = int(torch.randint(len(x), (1,), generator=g))
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = start
    norms = x.pow(2).sum(1)
    min_d = squared_distances(x, x[start : start + 1])[:, 0]
    for i in range(1, n):  # one matrix-vector product per step: |x|^2 - 2 x.c + |c|^2
        j = int(torch.argmax(min_d))
        chosen[i] = j
        torch.minimum(min_d, (norms - 2 * (x @ x[j]) + norms[j]).clamp_min_(0), out=min_d)
    return chosen.to(features.device)
