"""Torch-RecHub's ``DataGenerator`` / ``MatchDataGenerator`` on the batched data path.

Same arguments and batch format as the reference (``(x_dict, y)`` with one tensor per
feature), but batches are gathered with one ``index_select`` per column instead of
per-row ``__getitem__`` + collate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .base import check_split_ratio
from .datasets import TensorDictDataset, make_dataloader

__all__ = ["DataGenerator", "MatchDataGenerator"]


class DataGenerator:
    """Builds train/val/test loaders from dicts of arrays (reference API).

    Args:
        x: feature name -> array ``(N,)`` or ``(N, L)``.
        y: labels ``(N,)`` or ``(N, n_tasks)``.
        seed: seed of the random split and of the training shuffle. ``None`` (default) draws
            them from torch's global RNG exactly like the reference's ``random_split``, so
            ``torch.manual_seed(s)`` before the call gives the reference's splits.
    """

    def __init__(self, x: dict[str, Any], y: Any, seed: int | None = None) -> None:
        self.dataset = TensorDictDataset(x, y)
        self.length = len(self.dataset)
        self.seed = seed

    def _seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,)).item()) if self.seed is None else self.seed

    def generate_dataloader(
        self,
        x_val: dict[str, Any] | None = None,
        y_val: Any = None,
        x_test: dict[str, Any] | None = None,
        y_test: Any = None,
        split_ratio: tuple[float, float] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> tuple[DataLoader, DataLoader, DataLoader]:
        """``(train, val, test)`` loaders: split by ``split_ratio`` or from the given arrays."""
        if split_ratio is not None:
            split_ratio = check_split_ratio(split_ratio)
            n_train = int(self.length * split_ratio[0])
            n_val = int(self.length * split_ratio[1])
            if self.seed is None:  # the reference's random_split: one randperm from the global RNG
                perm = torch.randperm(self.length)
            else:
                perm = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed))
            rank_zero_info(f"the samples of train : val : test are {n_train} : {n_val} : {self.length - n_train - n_val}")
            train = self.dataset.subset(perm[:n_train])
            val = self.dataset.subset(perm[n_train : n_train + n_val])
            test = self.dataset.subset(perm[n_train + n_val :])
        else:
            train = self.dataset
            val = TensorDictDataset(x_val, y_val)
            test = TensorDictDataset(x_test, y_test)
        seed = self._seed()
        return (
            make_dataloader(train, batch_size, shuffle=True, seed=seed, num_workers=num_workers),
            make_dataloader(val, batch_size, train=False, num_workers=num_workers),
            make_dataloader(test, batch_size, train=False, num_workers=num_workers),
        )


class MatchDataGenerator:
    """Loaders for matching: training pairs/lists, test users and the item corpus (reference API).

    Args:
        x: training inputs.
        y: labels (empty for pair/list-wise training, which has none).
    """

    def __init__(self, x: dict[str, Any], y: Any = (), seed: int | None = None) -> None:
        has_y = y is not None and len(y) != 0
        self.dataset = TensorDictDataset(x, np.asarray(y) if has_y else None)
        self.seed = seed

    def generate_dataloader(
        self, x_test_user: dict[str, Any], x_all_item: dict[str, Any], batch_size: int, num_workers: int = 0
    ) -> tuple[DataLoader, DataLoader, DataLoader]:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if self.seed is None else self.seed
        return (
            make_dataloader(self.dataset, batch_size, shuffle=True, seed=seed, num_workers=num_workers),
            make_dataloader(TensorDictDataset(x_test_user), batch_size, train=False, num_workers=num_workers),
            make_dataloader(TensorDictDataset(x_all_item), batch_size, train=False, num_workers=num_workers),
        )
