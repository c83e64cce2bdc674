"""Turn the ``data:`` section of an experiment config into a prepared store, once.

:func:`resolve_store` is what the study driver calls before any trial and what the training loop
calls at start-up:

1. ``data.store`` points at a prepared store (its ``manifest.json`` exists): it is opened as is.
2. ``data.synthetic`` is set: the synthetic cohort is generated (``generate_cohort`` at ``data.grid``)
   into ``<cache>/cohorts/synthetic-<key>/`` unless already there, then prepared.
3. ``data.source`` is set: that cohort folder is prepared (``prepare``, which is itself idempotent:
   same fingerprint, no work).

The store goes to ``data.store`` when given, otherwise to ``<cache>/stores/<name>-<key>/``, where
``<key>`` hashes everything that changes the store's content (the source or synthetic spec, layout,
modality, grid, mask, resampling, error policy) and ``<cache>`` is ``cache_dir``, else
``$BRAINAGE_CACHE``, else ``~/.cache/brainage-study``. Generation and preparation run under a file
lock (``<cache>/locks/<key>.lock``), so concurrent trials or DDP workers asking for the same store
wait for the first one instead of racing; each then finds the finished store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from brainage_core.errors import ConfigError

log = logging.getLogger(__name__)

#: environment variable naming the cache folder
CACHE_ENV = "BRAINAGE_CACHE"
DEFAULT_CACHE = Path("~/.cache/brainage-study")
#: written into a synthetic cohort folder once generation has finished
COHORT_DONE = ".complete"

__all__ = ["CACHE_ENV", "cache_dir_of", "resolve_store", "source_key", "store_path_for"]


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    if isinstance(cfg, Mapping):
        return {k: (_as_dict(v) if is_dataclass(v) else v) for k, v in cfg.items()}
    raise ConfigError(f"data: found {type(cfg).__name__}: expected the data section (DataConfig or a mapping)")


def _expand(value: str, key: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise ConfigError(f"{key} = {value!r}: an environment variable in it is not set (found {expanded!r})")
    return expanded


def cache_dir_of(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$BRAINAGE_CACHE``, else ``~/.cache/brainage-study``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def _synthetic_spec(synthetic: Mapping[str, Any], grid: str) -> dict[str, Any]:
    from brainage_core.data.synthetic import GENERATOR_VERSION

    return {
        "generator": GENERATOR_VERSION,  # a new generator version never reuses an older cached cohort
        "subjects": synthetic.get("subjects", 300),
        "sites": synthetic.get("sites"),
        "strength": float(synthetic.get("strength", 1.5)),
        "age_confound": float(synthetic.get("age_confound", 1.0)),
        "seed": int(synthetic.get("seed", 0)),
        "grid": grid,
    }


def _store_spec(data: Mapping[str, Any]) -> dict[str, Any]:
    """What determines the content of the store (the input of :func:`source_key`)."""
    grid = data.get("grid", "full")
    spec: dict[str, Any] = {
        "layout": data.get("layout", "openbhb"),
        "modality": data.get("modality", "vbm"),
        "grid": grid,
        "on_error": data.get("on_error", "raise"),
    }
    if data.get("synthetic") is not None:
        spec["synthetic"] = _synthetic_spec(data["synthetic"], grid)
        spec["layout"] = "openbhb"
    else:
        spec["source"] = str(Path(_expand(str(data["source"]), "data.source")).resolve())
        spec["mask"] = str(Path(_expand(str(data["mask"]), "data.mask")).resolve()) if data.get("mask") else None
        spec["resample"] = bool(data.get("resample", False))
    return spec


def source_key(data_cfg: Any) -> str:
    """A 16-hex-digit key of the store content that ``data_cfg`` asks for (source or synthetic spec)."""
    spec = _store_spec(_as_dict(data_cfg))
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def store_path_for(data_cfg: Any, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`resolve_store` puts (or finds) the store of ``data_cfg``."""
    data = _as_dict(data_cfg)
    if data.get("store"):
        return Path(_expand(str(data["store"]), "data.store"))
    if data.get("synthetic") is None and not data.get("source"):
        raise ConfigError("data.store, data.source and data.synthetic are all null: expected one of them")
    name = "synthetic" if data.get("synthetic") is not None else Path(str(data["source"]).rstrip("/")).name or "source"
    return cache_dir_of(cache_dir) / "stores" / f"{name}-{source_key(data)}"


def _ensure_synthetic_cohort(spec: Mapping[str, Any], cache: Path, key: str, progress: bool) -> Path:
    """Generate the synthetic cohort of ``spec`` into the cache unless it is complete there (call under the lock)."""
    from brainage_core.data.synthetic import generate_cohort

    folder = cache / "cohorts" / f"synthetic-{key}"
    if (folder / COHORT_DONE).is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if folder.exists():  # an interrupted earlier attempt: start over
        shutil.rmtree(folder)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subjects = spec["subjects"]
    workers = 1 if subjects is not None and subjects <= 64 else max(1, min(os.cpu_count() or 1, 8))
    log.info("generating synthetic cohort %s (%s subjects, grid %s)", folder, subjects or "full", spec["grid"])
    generate_cohort(
        tmp,
        subjects=subjects,
        full=subjects is None,
        sites=spec["sites"],
        grid=spec["grid"],
        strength=spec["strength"],
        age_confound=spec["age_confound"],
        seed=spec["seed"],
        fmt="openbhb",
        workers=workers,
        progress=progress,
    )
    (tmp / COHORT_DONE).write_text(json.dumps(dict(spec), sort_keys=True) + "\n")
    os.replace(tmp, folder)
    return folder


def resolve_store(data_cfg: Any, cache_dir: str | Path | None = None, *, progress: bool = False):
    """The prepared :class:`~brainage_core.data.store.Store` that ``data_cfg`` describes (see module docstring).

    ``data_cfg`` is a ``DataConfig`` or a mapping with its keys. Idempotent and safe to call from
    several processes at once. Errors: :class:`ConfigError` when no store, source or synthetic cohort is
    given, or for a synthetic cohort with ``modality`` other than ``vbm``; ``StoreError`` when
    ``data.store`` names no store and there is nothing to prepare it from; preparation errors as
    ``prepare`` raises them.
    """
    from brainage_core.data.prepare import prepare
    from brainage_core.data.store import open_store

    data = _as_dict(data_cfg)
    out = store_path_for(data, cache_dir)
    if (out / "manifest.json").is_file():
        return open_store(out)
    if data.get("synthetic") is None and not data.get("source"):
        return open_store(out)  # raises StoreError naming the path
    if data.get("synthetic") is not None and data.get("modality", "vbm") != "vbm":
        raise ConfigError(
            f"data.modality = {data.get('modality')!r} with data.synthetic: the synthetic cohort is VBM only; "
            f"expected 'vbm'"
        )
    cache = cache_dir_of(cache_dir)
    key = source_key(data)
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "locks" / f"{key}.lock")):
        if (out / "manifest.json").is_file():  # another process finished it while we waited
            return open_store(out)
        spec = _store_spec(data)
        if "synthetic" in spec:
            source = _ensure_synthetic_cohort(spec["synthetic"], cache, key, progress)
        else:
            source = Path(spec["source"])
        if out.is_dir() and not (out / "manifest.json").exists() and cache / "stores" in out.parents:
            # the cache's own leftover of an interrupted earlier version (prepare refuses a folder holding
            # anything but a store; here the folder is ours)
            shutil.rmtree(out)
        log.info("preparing store %s from %s", out, source)
        return prepare(
            source,
            layout=spec["layout"],
            out=out,
            modality=spec["modality"],
            on_error=spec["on_error"],
            grid=spec["grid"],
            mask=spec.get("mask"),
            resample=spec.get("resample", False),
            progress=progress,
        )
