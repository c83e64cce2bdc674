"""A torch Dataset over one split of a prepared store.

Each item is ``(volume, age, site)``: ``volume`` a float16 tensor (1, D, H, W) holding one row of
the split's memmap (one volume is read; the array is never loaded whole), ``age`` a float32 scalar
tensor (years), ``site`` an int64 scalar tensor (index into ``store.site_labels``). The dataset is
picklable: DataLoader workers re-open the memmap lazily in their own process.

Batched reads: ``__getitems__`` (used by ``torch.utils.data.DataLoader`` for whole batches) reads the
rows of a batch straight into one buffer; with :func:`collate` as the DataLoader's ``collate_fn``
that buffer is the batch itself (no second copy). The default collate also works.
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

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """Read a whole batch into one contiguous buffer; items are views of it (see :func:`collate`)."""
        array = self.store.array(self.split)
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        buffer = _batch_buffer((len(rows), *self.volume_shape))
        out = buffer.numpy()
        for j, r in enumerate(rows):
            out[j] = array[r]
        ages = torch.from_numpy(self.ages[idx].copy())
        sites = torch.from_numpy(self.sites[idx].copy())
        return [(buffer[j], ages[j], sites[j]) for j in range(len(rows))]


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """Empty float16 tensor; in a DataLoader worker it lives in shared memory, so that sending the
    batch to the main process does not copy it again (as torch's default collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float16)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=torch.float16)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=torch.float16).new(storage).resize_(shape)


def collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch samples into (volumes (B, 1, D, H, W) float16, ages (B,) float32, sites (B,) int64).

    When the volumes are the consecutive views of one buffer made by ``StoreDataset.__getitems__``
    the buffer itself is returned (no copy); otherwise they are stacked.
    """
    volumes = [s[0] for s in samples]
    first = volumes[0]
    base = first._base if getattr(first, "_base", None) is not None else None
    if (
        base is not None
        and base.shape[0] == len(volumes)
        and base.is_contiguous()
        and all(v._base is base and v.data_ptr() == base[j].data_ptr() for j, v in enumerate(volumes))
    ):
        batch = base
    else:
        batch = torch.stack(volumes)
    ages = torch.stack([s[1] for s in samples]).to(torch.float32)
    sites = torch.stack([s[2] for s in samples]).to(torch.int64)
    return batch, ages, sites
