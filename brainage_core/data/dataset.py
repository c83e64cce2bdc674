"""A torch Dataset over one split of a prepared store.

Each item is ``(volume, age, site)``: ``volume`` a float16 tensor (1, D, H, W) holding one row of
the split's memmap (one volume is read; the array is never loaded whole), ``age`` a float32 scalar
tensor (years), ``site`` an int64 scalar tensor (index into ``store.site_labels``). The dataset is
picklable: DataLoader workers re-open the memmap lazily in their own process.

Batched reads: ``__getitems__`` (used by ``torch.utils.data.DataLoader`` for whole batches) reads the
rows of a batch straight into one buffer (in shared memory inside a worker); with :func:`collate`
as the DataLoader's ``collate_fn`` that buffer is the batch itself (no second copy, no per-sample
objects). The default collate also works but stacks again (slow for float16 on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from brainage_core.data.store import Store, open_store
from brainage_core.errors import StoreError

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StoreDataset(Dataset):
    """Rows ``rows`` (default: all) of split ``split`` of ``store`` as (volume, age, site) samples."""

    def __init__(self, store: Store | str | Path, split: str, rows: Sequence[int] | np.ndarray | None = None):
        self.store = store if isinstance(store, Store) else open_store(store)
        self.split = split
        table = self.store.table(split)  # StoreError for an unknown split
        n = len(table)
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
            bad = int(self.rows[(self.rows < 0) | (self.rows >= n)][0])
            raise StoreError(f"{self.store.path}: row {bad} is outside split {split!r} (rows 0..{n - 1})")
        #: float32 ages (years) and int64 site codes of the dataset's items, in item order
        self.ages = table["age"].to_numpy(dtype=np.float32)[self.rows]
        self.sites = self.store.site_codes(split)[self.rows]

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def volume_shape(self) -> tuple[int, ...]:
        """(1, D, H, W) of one item."""
        return tuple(self.store.manifest["shapes"][self.split][1:])

    def __getitem__(self, i: int) -> Sample:
        array = self.store.array(self.split)
        volume = torch.from_numpy(np.array(array[self.rows[i]]))  # reads exactly one volume
        return volume, torch.tensor(self.ages[i]), torch.tensor(self.sites[i])

    def __getitems__(self, indices: Sequence[int]) -> BatchSamples:
        """Read a whole batch into one contiguous buffer; returns the samples as views of it."""
        array = self.store.array(self.split)
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        buffer = _batch_buffer((len(rows), *self.volume_shape))
        out = buffer.numpy()
        for j, r in enumerate(rows):
            out[j] = array[r]
        ages = torch.from_numpy(self.ages[idx].copy())
        sites = torch.from_numpy(self.sites[idx].copy())
        return BatchSamples(buffer, ages, sites)


class BatchSamples(Sequence):
    """The samples of one batch as a sequence of (volume, age, site) views of three batch tensors.

    Behaves as a list of samples (torch's default collate accepts it); :func:`collate` returns the
    three tensors as they are, without building per-sample views or copying.
    """

    def __init__(self, volumes: torch.Tensor, ages: torch.Tensor, sites: torch.Tensor):
        self.volumes, self.ages, self.sites = volumes, ages, sites

    def __len__(self) -> int:
        return self.volumes.shape[0]

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return self.volumes[j], self.ages[j], self.sites[j]


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """Empty float16 tensor; in a DataLoader worker it lives in shared memory, so that sending the
    batch to the main process does not copy it again (as torch's default collate does)."""
    if get_worker_info() is None:
        # numpy asks for transparent huge pages on large buffers (torch's allocator does not): far
        # fewer page faults on a fresh 100+ MB batch
        return torch.from_numpy(np.empty(shape, dtype=np.float16))
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=torch.float16)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=torch.float16).new(storage).resize_(shape)


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch samples into (volumes (B, 1, D, H, W) float16, ages (B,) float32, sites (B,) int64).

    A :class:`BatchSamples` (what ``StoreDataset.__getitems__`` returns) is passed through without
    a copy; any other list of samples is stacked.
    """
    if isinstance(samples, BatchSamples):
        return samples.volumes, samples.ages, samples.sites
    volumes = torch.stack([s[0] for s in samples])
    ages = torch.stack([torch.as_tensor(s[1]) for s in samples]).to(torch.float32)
    sites = torch.stack([torch.as_tensor(s[2]) for s in samples]).to(torch.int64)
    return volumes, ages, sites
