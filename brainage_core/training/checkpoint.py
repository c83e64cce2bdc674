"""The one checkpoint format of brainage_core: a folder holding ``checkpoint.pt``.

``checkpoint.pt`` is a plain ``torch.save`` of a dict that ``torch.load(path, weights_only=True)``
reads back (tensors, ints, floats, strings, bools, None, lists and dicts only — no numpy arrays,
no pickled classes):

``format``            int, :data:`CHECKPOINT_FORMAT`
``epoch``             int, the last completed epoch (1-based; a resumed run starts at ``epoch + 1``)
``model``             state dict of the bare model (DDP and ``torch.compile`` wrappers removed)
``optimizer``         optimizer state dict
``scheduler``         LR scheduler state dict
``scaler``            gradient-scaler state dict or None (bf16 autocast needs no scaler)
``rng``               list indexed by rank of :func:`capture_rng_state` dicts
``world_size``        int, the number of ranks that produced ``rng``
``config``            the experiment configuration as a plain dict (``ExperimentConfig.to_dict()``)
``metrics``           the metrics dict of that epoch's evaluation (JSON-safe)
``wall_s``            float, wall-clock seconds spent in training and evaluation so far

Folders are written atomically (:func:`save_checkpoint`): the new folder is written under a temporary
name and renamed into place, so a reader never sees a half-written ``checkpoint.pt``.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_core.errors import BrainageError

#: version of the dict layout above
CHECKPOINT_FORMAT = 1
#: the file inside a checkpoint folder
CHECKPOINT_FILE = "checkpoint.pt"
#: the name of the latest checkpoint folder inside a training output folder
LATEST_DIR = "checkpoint"

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "LATEST_DIR",
    "CheckpointError",
    "capture_rng_state",
    "find_checkpoint",
    "json_safe",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]


class CheckpointError(BrainageError):
    """A checkpoint folder is missing, incomplete or of an unknown format (names the path)."""


# --------------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values
# --------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state of this process as tensors, ints and lists.

    Keys: ``torch`` (CPU generator, uint8 tensor), ``cuda`` (list of uint8 tensors, one per visible
    device; empty without CUDA), ``numpy`` (the legacy global MT19937 state: ``numpy_keys`` int64 tensor
    of 624 words, ``numpy_pos``, ``numpy_has_gauss``, ``numpy_gauss``), ``python`` (``random``'s state:
    version int, list of 625 ints, gauss_next float or None) and ``generators``: name -> uint8 tensor for
    each explicit ``torch.Generator`` passed (e.g. the DataLoader's and the augmentations').
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if name != "MT19937":  # pragma: no cover - numpy's legacy global state is always MT19937
        raise RuntimeError(f"unexpected numpy global RNG {name!r}: expected MT19937")
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "python": [int(py_version), [int(v) for v in py_state], py_gauss],
        "generators": {key: gen.get_state() for key, gen in (generators or {}).items()},
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back a state from :func:`capture_rng_state` (CUDA states only where CUDA is available).

    Every generator named in ``generators`` must be in the state: a missing one is a
    :class:`CheckpointError`, because a silently re-seeded generator would break exact resumption.
    """
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for index in range(n):
            torch.cuda.set_rng_state(cuda_states[index].to(torch.uint8), device=index)
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]), float(state["numpy_gauss"]))
    )
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_state), py_gauss))
    saved = state.get("generators") or {}
    for key, gen in (generators or {}).items():
        if key not in saved:
            raise CheckpointError(
                f"checkpoint RNG state has no generator {key!r}: found {sorted(saved)}; expected every "
                f"generator of the training loop"
            )
        gen.set_state(saved[key].to(torch.uint8))


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with numpy/torch scalars turned into Python ones and non-finite floats into None.

    Used for metrics, which go both into ``metrics.jsonl`` (strict JSON) and into the checkpoint.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metric value {value!r} of type {type(value).__name__}: expected a number, str, bool or None")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some file systems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    state: Mapping[str, Any], folder: str | Path, *, keep_previous_as: str | Path | None = None
) -> Path:
    """Write ``state`` as ``folder/checkpoint.pt`` atomically and return ``folder``.

    The dict is written into ``<folder>.tmp-<pid>``, flushed to disk, then renamed into place; an
    existing ``folder`` is first renamed aside (to ``keep_previous_as`` when given, otherwise to a
    temporary name that is deleted afterwards). If the process dies between the two renames,
    :func:`find_checkpoint` still finds the previous folder. The state is checked to be loadable
    with ``weights_only=True`` before anything is replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    file = tmp / CHECKPOINT_FILE
    with open(file, "wb") as handle:
        torch.save(dict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())
    torch.load(file, map_location="cpu", weights_only=True)  # fail here, not at resume time
    _fsync_dir(tmp)
    aside = Path(keep_previous_as) if keep_previous_as is not None else old
    if folder.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(folder, aside)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    if keep_previous_as is None and old.exists():
        shutil.rmtree(old)
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: a checkpoint folder itself, or a training output folder.

    For an output folder, its ``checkpoint/`` is used, or — if a crash happened between the two renames
    of :func:`save_checkpoint` — the folder left aside. :class:`CheckpointError` when there is none.
    """
    path = Path(path)
    if (path / CHECKPOINT_FILE).is_file():
        return path
    latest = path / LATEST_DIR
    if (latest / CHECKPOINT_FILE).is_file():
        return latest
    aside = sorted(path.glob(f".{LATEST_DIR}.old-*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
    if aside:
        return aside[-1].parent
    raise CheckpointError(
        f"no checkpoint at {path}: expected {path / CHECKPOINT_FILE} or {latest / CHECKPOINT_FILE}"
    )


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (folder, output folder or ``checkpoint.pt`` file) with ``weights_only=True``.

    Returns the dict described in the module docstring, plus ``path``: the folder it was read from.
    Raises :class:`CheckpointError` for a missing file, an unreadable one or an unknown ``format``.
    """
    path = Path(path)
    folder = path.parent if path.is_file() else find_checkpoint(path)
    file = folder / CHECKPOINT_FILE
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, runtime) for a bad file
        raise CheckpointError(f"checkpoint {file} is unreadable with weights_only=True: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {file} has format {found!r}: expected {CHECKPOINT_FORMAT}")
    missing = [key for key in ("epoch", "model", "config") if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {file} lacks {', '.join(missing)}: expected a full training checkpoint")
    state["path"] = str(folder)
    return state
