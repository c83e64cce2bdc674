"""The synthetic cohort's anatomy comes from files inside nilearn's wheel: nothing is downloaded."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np


def test_generation_needs_no_network(tmp_path, monkeypatch):
    import nilearn.datasets

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    for name in dir(nilearn.datasets):
        if name.startswith("fetch_"):
            monkeypatch.setattr(nilearn.datasets, name, refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    try:
        import requests

        monkeypatch.setattr(requests.Session, "request", refuse)
    except ImportError:  # requests is optional here
        pass
    data_dir = tmp_path / "nilearn_data"
    data_dir.mkdir()
    monkeypatch.setenv("NILEARN_DATA", str(data_dir))
    monkeypatch.setenv("NILEARN_SHARED_DATA", str(data_dir))

    from brainage_core.data import synthetic_anatomy
    from brainage_core.data.synthetic import generate_cohort

    # rebuild the templates from scratch inside the patched environment
    synthetic_anatomy._full_grid_templates.cache_clear()
    synthetic_anatomy.load_anatomy.cache_clear()
    table = generate_cohort(tmp_path / "cohort", subjects=4, sites=2, grid="6mm", progress=False)
    anatomy = synthetic_anatomy.load_anatomy("6mm")
    assert anatomy.brain.sum() > 5000 and 0.9 < float(anatomy.gm.max()) <= 1.0
    assert list(data_dir.iterdir()) == []  # nothing was cached or downloaded
    first = tmp_path / "cohort" / "train" / "derivatives" / f"sub-{table['participant_id'].iloc[0]}"
    assert np.load(next(first.rglob("*.npy"))).shape == (1, 1, 31, 37, 31)
