"""Opening a study, everything before Ray starts: validate the search space and the overrides, check the
study folder against ``--resume``, prepare the data store, write a new study's ``space.yaml`` and
``config.yaml`` (:func:`open_study`, called by :func:`study.run.run_study`).

Nothing is written before everything that can be checked without Ray has been (bad data fails while
preparing the store, before the folder is written); a remote folder is checked writable first, and
``--resume`` downloads config.yaml, space.yaml, results.parquet and optuna.db into its local mirror.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from brainage_core.config import config_differences
from brainage_core.errors import ConfigError, DataError
from study.results import journal_path, read_results
from study.space import SearchSpace, load_search_space
from study.storage import StudyFolder, is_uri, join_location

__all__ = ["Study", "check_folder", "local_space", "open_study", "resolved_config", "write_folder"]


@dataclass
class Study:
    """One study being run: its validated search space, its folder and its prepared data store."""

    space: SearchSpace
    space_path: Path  # a local file (a URI is downloaded first)
    name: str
    folder: StudyFolder
    store: Any
    resume: bool

    @property
    def study_dir(self) -> Path:
        """Where the driver writes (a remote folder: its local mirror)."""
        return self.folder.local


def open_study(space_path: str | Path, overrides: Sequence[str], *, name: str | None, storage: str | Path,
               resume: bool) -> Study:
    """Everything before Ray starts: validate the YAML and the overrides, check the study folder against
    ``--resume``, prepare the data store (bad data fails here, nothing written yet), then write a new
    study's space.yaml and config.yaml."""
    space_path = local_space(space_path)
    space = load_search_space(space_path, overrides)
    name = name or space_path.stem
    folder = StudyFolder(join_location(str(storage), name))
    if folder.is_remote:
        folder.check_writable()  # before anything is written
    config = resolved_config(space, overrides)
    check_folder(folder, space_path, config, resume)

    from brainage_core.data.sources import resolve_store

    print(f"[study] {name}: {space.study.num_samples} trials ({space.study.searcher}), objective "
          f"{space.study.objective} ({space.study.mode}); folder {folder.location}", flush=True)
    store = resolve_store(space.config.data, progress=True)
    print(f"[study] data store {store.path} (fingerprint {store.fingerprint})", flush=True)
    if not resume:
        write_folder(folder, space_path, config)
    return Study(space=space, space_path=space_path, name=name, folder=folder, store=store, resume=resume)


def resolved_config(space: SearchSpace, overrides: Sequence[str]) -> dict[str, Any]:
    """What ``config.yaml`` holds."""
    search = {k: v for k, v in (yaml.safe_load(Path(space.source).read_text()) or {}).get("search", {}).items()}
    return {**space.config.to_dict(), "search": search, "study": space.study.to_dict(), "overrides": list(overrides)}


def check_folder(folder: StudyFolder, space_path: Path, config: dict[str, Any], resume: bool) -> None:
    """Check the folder against ``--resume`` without writing into it (a remote folder: ``--resume`` first
    downloads config.yaml, results.parquet and optuna.db into its local mirror). ``--resume`` also checks
    that results.parquet, when there is one, is readable (before Ray starts)."""
    study_dir = folder.local
    config_path = study_dir / "config.yaml"
    where = folder.child("config.yaml")
    if resume:
        if not folder.exists("config.yaml"):
            raise ConfigError(f"--resume: no study in {folder.location} (no config.yaml): run without --resume first")
        if folder.is_remote:
            folder.clear_mirror()
            for rel in ("config.yaml", "space.yaml", "results.parquet", journal_path("results.parquet").name,
                        "optuna.db"):
                folder.download(rel)
        try:
            before = yaml.safe_load(config_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--resume: {where} is unreadable ({' '.join(str(exc).split())[:160]}); expected the "
                              "config.yaml the study wrote") from None
        if before != config:
            changed = [key for key, _, _ in config_differences(before, config)]
            raise ConfigError(f"--resume: {space_path} and overrides differ from {where} at "
                              f"{', '.join(changed[:5])}: expected the command that started the study")
        results = study_dir / "results.parquet"
        if results.exists() or journal_path(results).exists():
            try:
                read_results(results)
            except DataError as exc:
                raise DataError(f"--resume: {exc}: restore it from a backup, or move it away to resume with an "
                                "empty table") from None
        return
    if folder.exists("tune") or folder.exists("config.yaml"):
        raise ConfigError(f"study folder {folder.location} already holds a study: add --resume to continue it, or "
                          f"choose another --name / --storage")


def write_folder(folder: StudyFolder, space_path: Path, config: dict[str, Any]) -> None:
    """Write space.yaml / config.yaml of a new study (a remote folder: into its mirror, then uploaded).
    Called only once everything that can be validated before Ray starts has been (the data store too)."""
    study_dir = folder.local
    folder.clear_mirror()  # a stale mirror of an earlier study of that URI
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir / "space.yaml").write_text(space_path.read_text())
        (study_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"study folder {folder.location}: cannot write ({exc.strerror}: {exc.filename}); expected a "
                          "writable --storage") from None
    folder.upload("space.yaml")
    folder.upload("config.yaml")



def local_space(space_path: str | Path) -> Path:
    """The search-space YAML as a local file: a URI (``--submit`` stages it in the bucket) is downloaded
    into the cache, keeping its file name."""
    if not is_uri(space_path):
        return Path(space_path)
    from brainage_core.data.sources import cache_dir_of

    base, _, query = str(space_path).partition("?")
    parent, _, file_name = base.rpartition("/")
    target = cache_dir_of() / "studies" / ".jobs" / file_name
    if StudyFolder(f"{parent}?{query}" if query else parent).download(file_name, target) is None:
        raise ConfigError(f"{space_path}: no such search-space YAML on the object store")
    return target
