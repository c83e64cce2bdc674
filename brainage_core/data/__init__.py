"""The data layer: source readers, validation, the prepared store, Dataset and augmentations.

Entry points: :func:`prepare` (source cohort -> prepared store), :func:`open_store` /
:class:`Store` (read a prepared store), ``dataset.StoreDataset`` (torch Dataset over one split),
``augment.DeviceAugment`` (batched augmentations on the training device). Command line:
``python -m brainage_core.data prepare SOURCE --layout {openbhb,ramp,nifti} --out STORE``.
"""

from __future__ import annotations

from brainage_core.data.prepare import prepare
from brainage_core.data.store import Store, StoreWriter, open_store
from brainage_core.data.tables import SPLITS

__all__ = ["SPLITS", "Store", "StoreWriter", "open_store", "prepare"]
