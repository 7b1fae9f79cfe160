"""The batched tensor data path (DESIGN decision 4).

Data lives as column tensors. A sampler yields whole batches of row indices and the
dataset gathers a batch with one ``index_select`` per column, so a DataLoader with
``batch_size=None`` never touches single rows or a collate function.

Both samplers subclass :class:`torch.utils.data.DistributedSampler`, so Lightning
leaves them alone under DDP; they read the world size and rank from
``torch.distributed`` when iterated, which also makes loaders built before the
process group exists (e.g. by :class:`DataGenerator`) shard correctly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "TensorDictDataset",
    "TorchDataset",
    "PredictDataset",
    "ShuffledBatchSampler",
    "UnrepeatedBatchSampler",
    "make_dataloader",
    "BatchDataLoader",
    "to_tensor",
    "RaggedColumnError",
    "batch_sizes",
    "check_int",
]


def check_int(value: Any, arg: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a float such as 2.5 is an error, not a truncation);
    the error names ``arg`` and the value."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {arg}={value!r}")
    return int(value)


class RaggedColumnError(ValueError):
    """A column of sequences of different lengths where one tensor is needed."""

    def __init__(self, name: str, shortest: int, longest: int) -> None:
        self.name, self.shortest, self.longest = name, shortest, longest
        super().__init__(
            f"column {name!r} holds sequences of different lengths ({shortest} to {longest}): pad them to one "
            "length first (rechub_lightning.data.pad_sequences), or keep them in a per-row dataset and pad each "
            "batch in the DataLoader's collate_fn"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (DataLoader workers get a copy of the dataset)
        return type(self), (self.name, self.shortest, self.longest)


def _is_sequence(v: Any) -> bool:
    return hasattr(v, "__len__") and not isinstance(v, (str, bytes))


def _object_column(values: Any) -> np.ndarray:
    """A 1-D object array of the rows (numpy refuses to build one from rows of different lengths)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def to_tensor(values: Any, name: str = "?") -> torch.Tensor:
    """Column -> tensor: integers become int64, floats float32, 2-D arrays keep their width.

    A float64 column holding only whole numbers (ids after a pandas ``fillna``, say) becomes
    int64, so ids above float32's 2**24 stay exact; models read dense columns with ``.float()``.
    """
    if isinstance(values, torch.Tensor):
        t = values
    else:
        try:
            arr = np.asarray(values)
        except ValueError:  # rows of different lengths
            arr = _object_column(values)
        if arr.dtype == object:
            if arr.ndim == 1 and len(arr) and all(_is_sequence(v) for v in arr):
                lengths = [len(v) for v in arr]
                if min(lengths) != max(lengths):
                    raise RaggedColumnError(name, min(lengths), max(lengths))
            try:
                arr = np.stack([np.asarray(v) for v in arr]) if arr.ndim == 1 and len(arr) and _is_sequence(arr[0]) else arr.astype(np.float64)
            except (TypeError, ValueError) as e:
                raise TypeError(f"column {name!r} holds non-numeric values (e.g. {arr.flat[0]!r}); encode it first") from e
        if arr.dtype.kind in "US":
            as_what = "numbers (0/1 for a classification label)" if name == "label" else "ids"
            raise TypeError(f"column {name!r} holds strings (e.g. {arr.flat[0]!r}); encode it as {as_what} first")
        if arr.dtype == np.float64 and arr.size and _whole(arr):
            arr = arr.astype(np.int64)
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # e.g. pandas' copy-on-write views; torch wants writable memory
            arr = arr.copy()
        t = torch.from_numpy(arr)
    if t.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8, torch.int64):
        return t.long()
    if t.dtype == torch.bool:
        return t.float()
    return t.float()


def _whole(arr: np.ndarray) -> bool:
    """All values finite whole numbers that int64 (and float64) hold exactly."""
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(arr) < 2.0**53) and np.all(arr == np.floor(arr)))


class TensorDictDataset(Dataset):
    """Columns as tensors; ``ds[list_of_indices]`` returns a whole batch.

    Args:
        x: feature name -> array/tensor with the same first dimension.
        y: labels ``(N,)`` or ``(N, n_tasks)``, or ``None`` for prediction data.

    ``ds[i]`` with an int returns one row, so a plain ``DataLoader(ds, batch_size=...)``
    also works (slowly); use :func:`make_dataloader` for the fast path.
    """

    def __init__(self, x: Mapping[str, Any], y: Any = None) -> None:
        self._set({k: to_tensor(v, k) for k, v in x.items()}, y)

    def _set(self, x: dict[str, Any], y: Any) -> None:
        self.x = x
        self.y = None if y is None else to_tensor(y, "label").float()
        lengths = {k: len(v) for k, v in self.x.items()}
        if self.y is not None:
            lengths["<label>"] = len(self.y)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns have different lengths: {lengths}")
        self._len = next(iter(lengths.values())) if lengths else 0

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            xs = {k: v[index] for k, v in self.x.items()}
            return xs if self.y is None else (xs, self.y[index])
        idx = index if isinstance(index, torch.Tensor) else torch.as_tensor(index, dtype=torch.long)
        xs = {k: v.index_select(0, idx) for k, v in self.x.items()}
        return xs if self.y is None else (xs, self.y.index_select(0, idx))

    def subset(self, indices: Any) -> TensorDictDataset:
        """A new dataset holding only ``indices`` (copies the selected rows)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        out = TensorDictDataset.__new__(TensorDictDataset)
        out.x = {k: v.index_select(0, idx) for k, v in self.x.items()}
        out.y = None if self.y is None else self.y.index_select(0, idx)
        out._len = len(idx)
        return out


class _RowsOrColumns(TensorDictDataset):
    """Column tensors, or -- when a column holds sequences of different lengths -- Torch-RecHub's
    per-row dataset: such columns stay lists of rows, for a DataLoader whose ``collate_fn``
    pads each batch (the reference's session-based examples do that)."""

    #: columns kept as lists of rows because their lengths differ
    ragged: tuple[str, ...] = ()

    def __init__(self, x: Mapping[str, Any], y: Any = None) -> None:
        cols: dict[str, Any] = {}
        self._ragged_errors: list[RaggedColumnError] = []
        for k, v in x.items():
            try:
                cols[k] = to_tensor(v, k)
            except RaggedColumnError as e:
                cols[k] = list(v)
                self._ragged_errors.append(e)
        self._set(cols, y)
        self.ragged = tuple(e.name for e in self._ragged_errors)

    def check_batched(self) -> None:
        """Raise :class:`RaggedColumnError` when the batched path (whole-batch indexing) cannot
        serve this dataset."""
        if self._ragged_errors:
            raise self._ragged_errors[0]

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, (int, np.integer)):
            self.check_batched()
        return super().__getitem__(index)

    def subset(self, indices: Any) -> TensorDictDataset:
        if self.ragged:
            raise NotImplementedError(f"subset of a dataset with ragged columns {list(self.ragged)}; pad them first")
        return super().subset(indices)


class TorchDataset(_RowsOrColumns):
    """Torch-RecHub's ``TorchDataset(x, y)``: feature dict + labels, as column tensors.

    A plain ``DataLoader(TorchDataset(x, y), batch_size=...)`` works as in the reference;
    :func:`make_dataloader` over it takes the batched path. A column of sequences of
    different lengths stays a list of rows, as in the reference: give the DataLoader a
    ``collate_fn`` that pads them (the batched path needs padded columns).
    """

    def __init__(self, x: Mapping[str, Any], y: Any) -> None:
        super().__init__(x, y)


class PredictDataset(_RowsOrColumns):
    """Torch-RecHub's ``PredictDataset(x)``: features only, batches are ``x`` dicts (columns of
    sequences of different lengths as in :class:`TorchDataset`)."""

    def __init__(self, x: Mapping[str, Any]) -> None:
        super().__init__(x, None)


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is not None:
        return num_replicas, rank or 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _BatchSamplerBase(DistributedSampler):
    """Yields lists of row indices; shards by rank when iterated."""

    def __init__(self, n: int, batch_size: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        # DistributedSampler.__init__ would require an initialised process group; we resolve it lazily.
        self.n = int(n)
        self.batch_size = check_int(batch_size, "batch_size")
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self.dataset = None
        self._skip = 0

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return _world(self._num_replicas, self._rank)[0]

    @num_replicas.setter
    def num_replicas(self, v: int) -> None:
        self._num_replicas = v

    @property
    def rank(self) -> int:  # type: ignore[override]
        return _world(self._num_replicas, self._rank)[1]

    @rank.setter
    def rank(self, v: int) -> None:
        self._rank = v

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, n_batches: int) -> None:
        """Skip the first ``n_batches`` of the next iteration only (resuming mid-epoch)."""
        self._skip = int(n_batches)


class ShuffledBatchSampler(_BatchSamplerBase):
    """Training batches: a seeded permutation per epoch cut into batches, dealt round-robin to ranks.

    Every rank draws the same permutation (seed + epoch), so ranks get disjoint batches,
    reshuffled each epoch and reproducible from the seed. When the number of batches does
    not divide by the world size, the first batches are repeated so every rank runs the
    same number of steps (DDP requires it). A final batch of a single row joins the batch
    before it (``batch_size + 1`` rows): BatchNorm cannot train on one row, and in-batch
    negatives need two (streamed data does the same).

    Args:
        n: number of rows.
        batch_size: rows per batch.
        shuffle: permute rows each epoch (``False``: in order).
        drop_last: drop the final incomplete batch.
        seed: base seed of the permutation.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(n, batch_size, num_replicas, rank)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)

    def _num_batches(self) -> int:
        if self.drop_last or (self.n > self.batch_size and self.n % self.batch_size == 1):
            return self.n // self.batch_size  # no tail, or a 1-row tail merged into the last batch
        return math.ceil(self.n / self.batch_size)

    def smallest_batch(self) -> int:
        """Rows of the epoch's smallest batch (0 without batches)."""
        nb = self._num_batches()
        if nb == 0 or self.drop_last:
            return self.batch_size if nb else 0
        last = self.n - (nb - 1) * self.batch_size
        return last if nb == 1 else min(self.batch_size, last)

    def __len__(self) -> int:
        return math.ceil(self._num_batches() / self.num_replicas)

    def __iter__(self) -> Iterator[torch.Tensor]:
        world, rank = _world(self._num_replicas, self._rank)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        nb = self._num_batches()
        per_rank = math.ceil(nb / world)
        skip, self._skip = self._skip, 0
        for i in range(skip, per_rank):
            b = (i * world + rank) % nb if nb else 0
            if nb == 0:
                return
            end = self.n if b == nb - 1 and not self.drop_last else (b + 1) * self.batch_size
            yield order[b * self.batch_size : end]


class UnrepeatedBatchSampler(_BatchSamplerBase):
    """Evaluation batches: rank ``r`` reads a contiguous slice of rows, never padded or repeated.

    Slices differ in length by at most one row, so distributed metrics equal single-process
    ones exactly and gathered predictions come back in input order when concatenated by rank.
    """

    def _bounds(self) -> tuple[int, int]:
        world, rank = _world(self._num_replicas, self._rank)
        if 0 < self.n < world:
            # Every rank sees the same n and world, so every rank raises (no rank is left
            # waiting in a collective): Lightning cannot run an evaluation or prediction loop
            # on a rank without batches (it skips the rank's epoch hooks and their syncs).
            raise ValueError(
                f"the evaluation/prediction data has {self.n} row(s) for {world} processes: each process "
                "needs at least one row (rows are never padded or repeated, so that metrics and "
                "predictions are exact); run it on at most as many devices as rows (e.g. --trainer.devices 1)"
            )
        base, extra = divmod(self.n, world)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def __len__(self) -> int:
        start, end = self._bounds()
        return math.ceil((end - start) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, end = self._bounds()
        skip, self._skip = self._skip, 0
        for s in range(start + skip * self.batch_size, end, self.batch_size):
            yield torch.arange(s, min(s + self.batch_size, end))


class _CountingIterator:
    """Counts the batches handed to the training loop in ``loader._yielded``."""

    def __init__(self, it: Iterator[Any], loader: _ResumableLoader) -> None:
        self._it = it
        self._loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        self._loader._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]


class _ResumableLoader:
    """Mid-epoch resume for a DataLoader: Lightning saves ``state_dict()`` (epoch, batches
    consumed) in checkpoints and calls ``load_state_dict`` before the first iteration after a
    restart. A subclass's ``__iter__`` takes :meth:`_take_resume_skip` batches out of the epoch
    (however its data allows) and returns :meth:`_counting` of its iterator; it provides
    ``_loader_epoch()`` and ``set_epoch``.
    """

    _yielded = 0
    _resume_skip = 0
    _resume_epoch_done: bool | None = None
    # batches Lightning takes from this loader per epoch (``Trainer.num_training_batches``, which
    # ``limit_train_batches`` can make shorter than the loader); told by RecModule, else len(self)
    epoch_batches: float | None = None

    def _epoch_length(self) -> float:
        n = len(self)  # type: ignore[arg-type]
        return n if self.epoch_batches is None else min(n, self.epoch_batches)

    def _take_resume_skip(self) -> int:
        skip, self._resume_skip = self._resume_skip, 0
        done, self._resume_epoch_done = self._resume_epoch_done, None
        if done is None:  # a checkpoint written before its state said whether the epoch was done
            done = skip >= len(self)  # type: ignore[arg-type]
        if skip and done:
            # the checkpoint was written at the epoch's last batch (before its end hooks):
            # Lightning counts that epoch as done and starts the next one from its first batch
            skip = 0
        return skip

    def _counting(self, it: Iterator[Any], skipped: int) -> _CountingIterator:
        self._yielded = skipped
        return _CountingIterator(it, self)

    def _loader_epoch(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._loader_epoch(),
            "batches_consumed": self._yielded,
            "epoch_done": int(self._yielded >= self._epoch_length()),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_skip = int(state_dict.get("batches_consumed", 0))
        done = state_dict.get("epoch_done")
        self._resume_epoch_done = None if done is None else bool(done)
        self.set_epoch(int(state_dict.get("epoch", 0)))


class BatchDataLoader(_ResumableLoader, DataLoader):
    """A DataLoader over a batch sampler that can resume in the middle of an epoch.

    The next iteration after ``load_state_dict`` tells the sampler to skip the batches the
    training loop had already consumed, so a resumed run sees exactly the batches an
    uninterrupted run would. (Lightning does not prefetch from loaders with a length, so the
    batches handed out when a checkpoint is written are the batches consumed.)
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not isinstance(self.sampler, _BatchSamplerBase):
            # e.g. Trainer(overfit_batches=N) rebuilds the loader around a row-by-row SequentialSampler
            raise ValueError(
                f"this loader gathers whole batches through its batch sampler, but it was rebuilt with a "
                f"{type(self.sampler).__name__} (Trainer(overfit_batches=...) does this, and is not supported); to train on a "
                f"few batches use limit_train_batches=N and limit_val_batches=N"
            )
        skip = self._take_resume_skip()
        self.sampler.skip_next(skip)
        return self._counting(super().__iter__(), skip)

    def _loader_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    train: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a :class:`TensorDictDataset` that yields whole gathered batches.

    ``train`` (default: ``shuffle``) picks the sampler: training batches are dealt to ranks
    with :class:`ShuffledBatchSampler`, evaluation uses :class:`UnrepeatedBatchSampler`.
    """
    train = shuffle if train is None else train
    if isinstance(dataset, _RowsOrColumns):
        dataset.check_batched()
    n = len(dataset)  # type: ignore[arg-type]
    sampler: _BatchSamplerBase
    if train:
        sampler = ShuffledBatchSampler(n, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    else:
        sampler = UnrepeatedBatchSampler(n, batch_size)
    return BatchDataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        # A private generator: creating an iterator draws a worker base seed from it instead
        # of from torch's global RNG, so iterating data never shifts dropout/negative sampling
        # randomness (and a resumed run draws exactly what an uninterrupted one would).
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def batch_sizes(loader: Any) -> tuple[int, int, int] | None:
    """``(batch size, rows of the epoch's smallest batch, rows)`` of a (training) loader, or ``None``
    when the loader does not say (an iterable, a stream, a custom batch sampler).

    Reads :func:`make_dataloader`'s batch sampler (which merges a 1-row tail into the batch before
    it), or a plain DataLoader's ``batch_size`` and sampler length (under DDP Lightning's ``DistributedSampler``: this process's rows).
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShuffledBatchSampler):
        smallest = sampler.smallest_batch()
        return (sampler.batch_size, smallest, sampler.n) if smallest else None
    bs = getattr(loader, "batch_size", None)
    if not isinstance(bs, int) or bs < 1 or sampler is None:
        return None
    try:
        n = len(sampler)
    except TypeError:
        return None
    drop_last = bool(getattr(loader, "drop_last", False))
    if n == 0 or (drop_last and n < bs):
        return None
    return bs, bs if drop_last or n % bs == 0 else n % bs, n
