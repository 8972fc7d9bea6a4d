"""Batches cut from tensors that already live on the training device.

Images are decoded once; every step only indexes device memory. The loader shards across
distributed ranks itself, reshuffles per epoch from ``(seed, epoch)`` and is stateful, so a
checkpoint taken mid-epoch resumes at the next unseen batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


class DeviceBatchLoader:
    """Iterable of dicts of tensor slices, all tensors sharing their first dimension."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(t) for k, t in tensors.items()} }")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = tensors
        self.n = sizes.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch_fn = epoch_fn or (lambda: 0)
        self._skip: tuple[int, int] | None = None  # (epoch, batches already consumed)
        self._done = 0
        self._epoch = 0

    def _indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.world_size > 1:
            if self.drop_last:  # equal shard sizes so every rank runs the same number of steps
                order = order[: self.n - self.n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self._indices(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._epoch = self.epoch_fn()
        order = self._indices(self._epoch)
        device = next(iter(self.tensors.values())).device
        start = self._skip[1] if self._skip is not None and self._skip[0] == self._epoch else 0
        self._skip = None
        self._done = start
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].to(device)
            self._done = b + 1
            yield {k: t.index_select(0, idx) for k, t in self.tensors.items()}

    # Lightning saves and restores these through its fit-loop state (mid-epoch resume).
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = (int(state.get("epoch", 0)), int(state.get("batches_done", 0)))
