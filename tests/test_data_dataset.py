"""StoreDataset (items, rows, pickling, DataLoader workers, collate) and DeviceAugment."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from brainage_core.data.augment import DeviceAugment
from brainage_core.data.dataset import StoreDataset, collate
from brainage_core.data.store import StoreWriter, open_store
from brainage_core.errors import DataError, StoreError
from brainage_core.grids import grid_shape

torch.set_num_threads(1)


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    n = 10
    volumes = rng.random((n, 1, *grid_shape("6mm")), dtype=np.float32)
    with StoreWriter(tmp_path / "store") as writer:
        writer.clear()
        for v in volumes:
            writer.append("train", v)
        table = pd.DataFrame(
            {
                "participant_id": [f"p{i}" for i in range(n)],
                "age": np.linspace(7.0, 80.0, n),
                "sex": "M",
                "site": [["b", "a", "c"][i % 3] for i in range(n)],
                "site_raw": "x",
                "split": "train",
                "row": np.arange(n),
                "source_path": "",
            }
        )
        writer.finish(table, {"source": "t", "layout": "test", "modality": "vbm", "grid": "6mm", "fingerprint": "f"})
    return open_store(tmp_path / "store"), volumes, table


def test_items_are_rows_of_the_memmap(store):
    st, volumes, table = store
    ds = StoreDataset(st, "train")
    assert len(ds) == 10 and ds.volume_shape == (1, 31, 37, 31)
    vol, age, site = ds[4]
    assert vol.dtype == torch.float16 and vol.shape == (1, 31, 37, 31)
    assert age.dtype == torch.float32 and age.ndim == 0 and age.item() == pytest.approx(table["age"][4])
    assert site.dtype == torch.int64 and st.site_labels[site.item()] == table["site"][4] == "a"
    np.testing.assert_array_equal(vol.numpy(), volumes[4].astype(np.float16))
    # the dataset holds the memmap, never a loaded copy of the array
    assert isinstance(st.array("train"), np.memmap)


def test_rows_subset_and_errors(store, tmp_path):
    st, volumes, _ = store
    ds = StoreDataset(tmp_path / "store", "train", rows=[7, 2])
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[1][0].numpy(), volumes[2].astype(np.float16))
    with pytest.raises(StoreError, match="row 12 is outside split 'train'"):
        StoreDataset(st, "train", rows=[1, 12])
    with pytest.raises(StoreError, match="no split 'external_test'"):
        StoreDataset(st, "external_test")


def test_pickles_without_the_memmap(store):
    st, volumes, _ = store
    ds = StoreDataset(st, "train")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.store._arrays == {}
    np.testing.assert_array_equal(clone[3][0].numpy(), volumes[3].astype(np.float16))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("use_collate", [True, False])
def test_dataloader_batches(store, workers, use_collate):
    st, volumes, table = store
    ds = StoreDataset(st, "train", rows=np.arange(1, 10))
    loader = DataLoader(
        ds, batch_size=4, shuffle=False, num_workers=workers, collate_fn=collate if use_collate else None
    )
    seen = []
    for x, age, site in loader:
        assert x.dtype == torch.float16 and x.shape[1:] == (1, 31, 37, 31)
        assert age.dtype == torch.float32 and site.dtype == torch.int64 and len(age) == len(site) == x.shape[0]
        seen.append((x, age))
    x = torch.cat([b[0] for b in seen])
    ages = torch.cat([b[1] for b in seen])
    np.testing.assert_array_equal(x.numpy(), volumes[1:].astype(np.float16))
    np.testing.assert_allclose(ages.numpy(), table["age"][1:].to_numpy(), rtol=1e-6)


def test_collate_reuses_the_batch_buffer(store):
    st, _, _ = store
    ds = StoreDataset(st, "train")
    samples = ds.__getitems__([3, 1, 4])
    assert len(samples) == 3 and torch.equal(samples[1][0], ds[1][0]) and samples[2][1] == ds[4][1]
    x, ages, _ = collate(samples)
    assert x.data_ptr() == samples[0][0].data_ptr() and x.shape == (3, 1, 31, 37, 31)
    assert torch.equal(ages, torch.stack([ds[3][1], ds[1][1], ds[4][1]]))
    x2, _, _ = collate([ds[3], ds[1]])  # independent tensors: stacked
    assert torch.equal(x2[1], ds[1][0])


# -- augmentations ---------------------------------------------------------------------------------
def _batch(grid="6mm", b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 1, *grid_shape(grid)), generator=g) + 0.5  # strictly positive


def test_no_option_is_identity():
    x = _batch()
    assert DeviceAugment("6mm")(x) is x


@pytest.mark.parametrize("grid,side", [("6mm", 32), ("3mm", 64)])
def test_crop_then_pad_to_cube(grid, side):
    x = _batch(grid, b=3)
    aug = DeviceAugment(grid, crop=True)
    y = aug(x, generator=torch.Generator().manual_seed(1))
    assert y.shape == (3, 1, side, side, side) and aug.output_spatial_shape == (side,) * 3
    d, h, w = grid_shape(grid)
    pd_, pw = (side - d) // 2, (side - w) // 2
    for i in range(3):
        inner = y[i, 0, pd_ : pd_ + d, :, pw : pw + w]
        # each sample is x[i] cropped to `side` consecutive rows of the H axis at some offset
        offsets = [o for o in range(h - side + 1) if torch.equal(inner, x[i, 0, :, o : o + side, :])]
        assert len(offsets) == 1
        assert y[i].sum() == pytest.approx(inner.sum().item(), rel=1e-5)  # padding is zero
    # offsets differ across samples (random per sample, not per batch)
    xb = _batch(grid, b=16)
    big = aug(xb, generator=torch.Generator().manual_seed(2))
    found = set()
    for i in range(16):
        inner = big[i, 0, pd_ : pd_ + d, :, pw : pw + w]
        found |= {o for o in range(h - side + 1) if torch.equal(inner, xb[i, 0, :, o : o + side, :])}
    assert len(found) >= 2
    centred = aug.center(x)
    start = (h - side) // 2
    assert torch.equal(centred[:, :, pd_ : pd_ + d, :, pw : pw + w], x[:, :, :, start : start + side, :])


def test_cutout_zeroes_one_cube_with_probability_half():
    x = _batch("6mm", b=400)
    aug = DeviceAugment("6mm", cutout=True)
    y = aug(x, generator=torch.Generator().manual_seed(3))
    zeros = (y == 0).flatten(1).sum(1)
    cut = zeros > 0
    assert set(zeros[cut].tolist()) == {8**3}  # one 8³ cube (32³ at the full grid / 4)
    assert 0.4 < cut.float().mean().item() < 0.6
    i = int(torch.nonzero(cut)[0])
    idx = torch.nonzero(y[i, 0] == 0)
    extent = (idx.max(0).values - idx.min(0).values + 1).tolist()
    assert extent == [8, 8, 8]
    assert torch.equal(y[~cut], x[~cut])


def test_zscore_and_reproducibility():
    x = _batch("6mm", b=4) * 3.0
    y = DeviceAugment("6mm", zscore=True)(x)
    flat = y.flatten(1)
    np.testing.assert_allclose(flat.mean(1).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(1).numpy(), 1.0, atol=1e-3)
    aug = DeviceAugment("6mm", crop=True, cutout=True, zscore=True)
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.shape == (4, 1, 32, 32, 32)


def test_wrong_input_is_an_error():
    with pytest.raises(DataError, match=r"augment input .* expected a float batch \(B, C, 31, 37, 31\) on grid 6mm"):
        DeviceAugment("6mm", crop=True)(torch.zeros(2, 1, 61, 73, 61))
    with pytest.raises(DataError, match="augment grid '2mm'"):
        DeviceAugment("2mm")
