"""Feature extraction: the frozen representation the probes read.

``model.features(x)`` (see ``docs/interfaces.md``, Models) gives (B, p): the L2-normalised projection
for contrastive models, the encoder output for supervised ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from brainage_core.errors import BrainageError


def extract_features(
    model: torch.nn.Module,
    array: np.ndarray,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features of ``array[rows]`` as float32 numpy (len(rows), p), in the order of ``rows``.

    ``array``: (N, 1, D, H, W), typically the float16 memmap of a store split; read ``batch_size`` rows at a
    time (rows sorted within the call for sequential reads), converted to float32 on ``device``, run in
    ``torch.inference_mode()`` with the model in eval mode (its previous mode is restored afterwards).
    ``rows=None`` means every row. Models without a ``features`` method are called directly.
    """
    if batch_size < 1:
        raise BrainageError(f"extract_features: batch_size = {batch_size}; expected an integer >= 1")
    n_total = array.shape[0]
    rows_arr = np.arange(n_total) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows_arr.size and (rows_arr.min() < 0 or rows_arr.max() >= n_total):
        bad = int(rows_arr[(rows_arr < 0) | (rows_arr >= n_total)][0])
        raise BrainageError(f"extract_features: row {bad} out of range; the array has {n_total} rows")
    device = torch.device(device)
    order = np.argsort(rows_arr, kind="stable")
    sorted_rows = rows_arr[order]
    forward = getattr(model, "features", model)
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, sorted_rows.size, batch_size):
                idx = sorted_rows[start : start + batch_size]
                batch = torch.from_numpy(np.asarray(array[idx], dtype=np.float32))
                out = forward(batch.to(device, non_blocking=True))
                if out.ndim != 2 or out.shape[0] != idx.size:
                    raise BrainageError(
                        f"extract_features: model features of shape {tuple(out.shape)} for a batch of {idx.size}; "
                        f"expected ({idx.size}, p)"
                    )
                chunks.append(out.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not chunks:
        p = 0
        return np.zeros((0, p), dtype=np.float32)
    feats = np.concatenate(chunks, axis=0)
    out_arr = np.empty_like(feats)
    out_arr[order] = feats
    return out_arr
