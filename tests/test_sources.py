"""resolve_store: synthetic generation + preparation into the cache, idempotence, locking, errors."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

import brainage_core.data.synthetic as synthetic
from brainage_core.data import sources
from brainage_core.data.prepare import prepare
from brainage_core.data.sources import resolve_store, source_key, store_path_for
from brainage_core.errors import ConfigError, StoreError

SYNTH = {"subjects": 12, "sites": 3, "strength": 1.5, "age_confound": 1.0, "seed": 0}


def data_cfg(**extra) -> dict:
    return {"grid": "6mm", "synthetic": dict(SYNTH), **extra}


def counting_generate(counter: Path):
    real = synthetic.generate_cohort

    def generate(out, **kwargs):
        with open(counter, "a") as handle:
            handle.write("x")
        return real(out, **kwargs)

    return generate


def test_synthetic_store_is_generated_once(tmp_path, monkeypatch):
    counter = tmp_path / "calls"
    monkeypatch.setattr(synthetic, "generate_cohort", counting_generate(counter))
    store = resolve_store(data_cfg(), cache_dir=tmp_path / "cache")
    assert store.grid == "6mm" and sum(len(store.table(s)) for s in store.splits) == 12
    assert store.path.parent == tmp_path / "cache" / "stores"
    assert store.path.name == f"synthetic-{source_key(data_cfg())}"
    manifest_time = (store.path / "manifest.json").stat().st_mtime_ns
    again = resolve_store(data_cfg(), cache_dir=tmp_path / "cache")
    assert again.path == store.path and again.fingerprint == store.fingerprint
    assert (store.path / "manifest.json").stat().st_mtime_ns == manifest_time
    assert counter.read_text() == "x"
    # A different cohort spec is a different store.
    other = data_cfg(synthetic={**SYNTH, "strength": 0.0})
    assert store_path_for(other, tmp_path / "cache") != store.path


def test_cache_env_and_explicit_store(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path / "envcache"))
    assert store_path_for(data_cfg()).parent == tmp_path / "envcache" / "stores"
    explicit = tmp_path / "mystore"
    store = resolve_store(data_cfg(store=str(explicit)))
    assert store.path == explicit
    # A prepared store named alone is opened as is.
    assert resolve_store({"store": str(explicit)}).fingerprint == store.fingerprint


def test_source_folder_is_prepared(tmp_path):
    synthetic.generate_cohort(tmp_path / "cohort", subjects=8, sites=2, grid="6mm", seed=1, progress=False)
    cfg = {"source": str(tmp_path / "cohort"), "layout": "openbhb", "grid": "6mm"}
    store = resolve_store(cfg, cache_dir=tmp_path / "cache")
    assert store.path.name.startswith("cohort-")
    assert store.fingerprint == prepare(tmp_path / "cohort", layout="openbhb", out=store.path, grid="6mm",
                                        progress=False).fingerprint


def _resolve_in_child(args) -> str:
    cfg, cache = args
    return resolve_store(cfg, cache_dir=cache).fingerprint


def test_concurrent_callers_share_one_generation(tmp_path, monkeypatch):
    counter = tmp_path / "calls"
    monkeypatch.setattr(synthetic, "generate_cohort", counting_generate(counter))
    ctx = multiprocessing.get_context("fork")  # children inherit the counting patch
    with ctx.Pool(2) as pool:
        prints = pool.map(_resolve_in_child, [(data_cfg(), str(tmp_path / "cache"))] * 2)
    assert prints[0] == prints[1]
    assert counter.read_text() == "x"


def test_errors_name_the_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="data.store, data.source and data.synthetic"):
        resolve_store({"grid": "6mm"}, cache_dir=tmp_path)
    with pytest.raises(StoreError, match=str(tmp_path / "nothing")):
        resolve_store({"store": str(tmp_path / "nothing")}, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.modality = 'quasiraw'"):
        resolve_store(data_cfg(modality="quasiraw"), cache_dir=tmp_path)
    monkeypatch.delenv("BRAINAGE_TEST_UNSET_ROOT", raising=False)
    with pytest.raises(ConfigError, match="data.source"):
        resolve_store({"source": "${BRAINAGE_TEST_UNSET_ROOT}/x", "grid": "6mm"}, cache_dir=tmp_path)


def test_interrupted_generation_is_redone(tmp_path):
    cache = tmp_path / "cache"
    key = source_key(data_cfg())
    broken = cache / "cohorts" / f"synthetic-{key}"
    broken.mkdir(parents=True)
    (broken / "junk").write_text("half-written")
    store = resolve_store(data_cfg(), cache_dir=cache)
    assert (broken / sources.COHORT_DONE).is_file() and not (broken / "junk").exists()
    assert len(store.table("train")) > 0
