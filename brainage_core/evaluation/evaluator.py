"""The evaluation run at every ``eval_every`` epochs on rank 0: features, probes, metrics, leakage.

``val_*`` (what searches optimise): probes fit on the training part of the validation split (train split
minus the validation parts), scored on the internal part (MAE, RMSE, site BAcc) and the external part
(MAE, RMSE). ``val_lc`` uses n_sites = the number of sites of the train split.

``test_*`` (reported, never optimised): probes fit on the whole ``train`` split as the challenge does,
scored on ``internal_test`` (MAE, RMSE, BAcc) and ``external_test`` (MAE, RMSE); ``test_lc`` uses
n_sites = the number of sites of the store (64 on OpenBHB).

Constant baselines, per evaluation, so a reader can tell whether anything was learned:
``<prefix>_mae_int_const`` / ``<prefix>_mae_ext_const`` are the MAEs (years) of predicting, for every
subject of the scored part, the median age of the rows the age probe was fit on (the same rows, the
same split); ``<prefix>_bacc_chance`` is the chance balanced accuracy of that part, 1 / (number of
sites present in it), i.e. from the cohort's own site count, not the challenge's 64.

Probes are never fit on test subjects. ``leaked`` is True when the model was trained on test subjects
(``training.train_on: all``, or a participant id present both in the training rows and a test split);
every test metric of that evaluation must then be reported as leaked. Missing parts (no test splits,
a validation fraction of 0, ``train_on`` other than ``train_minus_val`` for ``val_*``) give NaN.

``protocol`` (``exact`` | ``fast``, ``docs/probes.md``): how the probes are fitted; the fast protocol
fits them on the evaluation device from the features extracted there.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from brainage_core.data.store import require_known_ages
from brainage_core.errors import ConfigError, NonFiniteLossError
from brainage_core.evaluation.features import extract_features
from brainage_core.evaluation.probes import PROTOCOLS, fit_age_probe, fit_site_probe
from brainage_core.evaluation.scores import balanced_accuracy, challenge_scores, chance_balanced_accuracy, mae, rmse
from brainage_core.evaluation.validation import ValidationSplit, make_validation_split
from brainage_core.metrics import QUANTITIES

TRAIN_ON_CHOICES = ("train_minus_val", "train", "all")
TEST_SPLITS = ("internal_test", "external_test")
#: Every key of :meth:`Evaluator.evaluate`'s result besides ``leaked`` and the probe notes.
METRIC_SUFFIXES: tuple[str, ...] = tuple(QUANTITIES)  # brainage_core/metrics.py, in its order


def training_rows(store: Any, train_on: str, split: ValidationSplit | None) -> dict[str, np.ndarray]:
    """The rows the model trains on, per store split, for ``training.train_on``.

    ``train_minus_val``: the training part of ``split``; ``train``: the whole train split; ``all``: every row
    of every split (test subjects included: leaked).
    """
    if train_on not in TRAIN_ON_CHOICES:
        raise ConfigError(f"training.train_on = {train_on!r}: expected one of {', '.join(TRAIN_ON_CHOICES)}")
    if train_on == "train_minus_val":
        if split is None:
            raise ConfigError("training.train_on = 'train_minus_val' needs a validation split")
        return {"train": split.train_rows}
    n_train = store.array("train").shape[0]
    out = {"train": np.arange(n_train, dtype=np.int64)}
    if train_on == "all":
        for name in store.splits:
            if name != "train":
                out[name] = np.arange(store.array(name).shape[0], dtype=np.int64)
    return out


class Evaluator:
    """Evaluates a model on a prepared store with the challenge probes.

    Long for a reason: the validation split, the features, the probes and the leak check share one
    state (the split and the labels computed once here); the split, features, probes and scores
    themselves live in ``validation.py``, ``features.py``, ``probes.py`` and ``scores.py``.

    ``store``: a :class:`brainage_core.data.store.Store` (needs ``splits``, ``site_labels``, ``array(split)``,
    ``table(split)`` with columns participant_id, age, site, row). ``evaluation``: the config's
    ``EvaluationConfig`` (``val_internal_frac``, ``val_external_frac``, ``val_seed``, ``batch_size``, ``test``,
    ``protocol``: the default of :meth:`evaluate`; a config without it means ``exact``).
    ``train_on``: ``training.train_on``. The validation split is computed once, here, and exposed as
    ``self.split``; ``self.training_rows`` is what the training loop must train on. ``seed`` drives the
    site probe's solver; ``n_jobs`` the probes' grid searches (scikit-learn's meaning).
    """

    def __init__(
        self,
        store: Any,
        evaluation: Any,
        *,
        train_on: str = "train_minus_val",
        seed: int = 0,
        n_jobs: int | None = None,
    ):
        if "train" not in store.splits:
            raise ConfigError(f"{store.path}: the store has no 'train' split; the probes are fit on it")
        # Probes, validation split, metrics and the training loop (built after this) all need ages.
        require_known_ages(store, purpose="training and evaluation")
        self.store = store
        self.evaluation = evaluation
        self.train_on = train_on
        self.seed = seed
        self.n_jobs = n_jobs
        self.train_table = store.table("train")
        self.split: ValidationSplit | None = None
        if train_on == "train_minus_val":
            self.split = make_validation_split(
                self.train_table,
                internal_frac=evaluation.val_internal_frac,
                external_frac=evaluation.val_external_frac,
                seed=evaluation.val_seed,
            )
        self.training_rows = training_rows(store, train_on, self.split)
        self._site_code = {label: i for i, label in enumerate(store.site_labels)}
        self.test_splits = [s for s in TEST_SPLITS if s in store.splits]
        self.leaked = self._is_leaked()

    # -- helpers -----------------------------------------------------------------------------------
    def _is_leaked(self) -> bool:
        if self.train_on == "all" and self.test_splits:
            return True
        trained_ids: set[str] = set()
        for name, rows in self.training_rows.items():
            table = self.train_table if name == "train" else self.store.table(name)
            trained_ids.update(table.set_index("row").loc[rows, "participant_id"].astype(str))
        for name in self.test_splits:
            if trained_ids.intersection(self.store.table(name)["participant_id"].astype(str)):
                return True
        return False

    def _labels(self, table: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = table.set_index("row").loc[rows]
        ages = part["age"].to_numpy(dtype=np.float64)
        sites = part["site"].astype(str).map(self._site_code).to_numpy(dtype=np.int64)
        return ages, sites

    def _features(self, model: torch.nn.Module, split: str, rows: np.ndarray, device: Any) -> np.ndarray:
        feats = extract_features(
            model, self.store.array(split), rows, batch_size=self.evaluation.batch_size, device=device
        )
        if not np.isfinite(feats).all():
            raise NonFiniteLossError(
                f"non-finite features on {split} (row {int(rows[np.argwhere(~np.isfinite(feats))[0, 0]])}): "
                "the model diverged; expected finite features"
            )
        return feats

    @staticmethod
    def _score(
        prefix: str,
        age_probe: Any,
        site_probe: Any,
        internal: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        external: tuple[np.ndarray, np.ndarray] | None,
        n_sites: int,
        fit_ages: np.ndarray | None = None,
    ) -> dict[str, float]:
        nan = math.nan
        const = float(np.median(fit_ages)) if fit_ages is not None and fit_ages.size else nan
        m = {f"{prefix}_{k}": nan for k in METRIC_SUFFIXES}
        if internal is not None and internal[0].shape[0]:
            X, ages, sites = internal
            pred = age_probe.predict(X)
            m[f"{prefix}_mae_int"], m[f"{prefix}_rmse_int"] = mae(ages, pred), rmse(ages, pred)
            m[f"{prefix}_mae_int_const"] = mae(ages, np.full_like(ages, const))
            m[f"{prefix}_bacc"] = balanced_accuracy(sites, site_probe.predict(X))
            m[f"{prefix}_bacc_chance"] = chance_balanced_accuracy(sites)
        if external is not None and external[0].shape[0]:
            X, ages = external
            pred = age_probe.predict(X)
            m[f"{prefix}_mae_ext"], m[f"{prefix}_rmse_ext"] = mae(ages, pred), rmse(ages, pred)
            m[f"{prefix}_mae_ext_const"] = mae(ages, np.full_like(ages, const))
        scores = challenge_scores(m[f"{prefix}_mae_int"], m[f"{prefix}_mae_ext"], m[f"{prefix}_bacc"], n_sites)
        m.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return m

    # -- the evaluation ----------------------------------------------------------------------------
    def evaluate(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", *, protocol: str | None = None
    ) -> dict[str, Any]:
        """Metrics of ``model``: ``val_*`` and ``test_*`` (see the module docstring), ``leaked`` (bool),
        ``eval_s`` (seconds, feature extraction and probe fits), ``probe_notes`` (str; empty when the
        probes followed the protocol) and ``protocol`` (``exact`` | ``fast``; None: ``evaluation.protocol``).
        Features are extracted on ``device`` in inference mode; fast probes are fitted there too."""
        if protocol is None:
            protocol = getattr(self.evaluation, "protocol", "exact")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"evaluation.protocol = {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        probe_device = torch.device(device) if protocol == "fast" else None
        start = time.perf_counter()
        n_train = self.store.array("train").shape[0]
        all_rows = np.arange(n_train, dtype=np.int64)
        train_X = self._features(model, "train", all_rows, device)
        train_ages, train_sites = self._labels(self.train_table, all_rows)
        notes: list[str] = []
        n_train_sites = len(np.unique(train_sites))

        if self.split is not None:
            fit = self.split.train_rows
            age_probe = fit_age_probe(
                train_X[fit], train_ages[fit], protocol=protocol, device=probe_device, n_jobs=self.n_jobs
            )
            site_probe = fit_site_probe(
                train_X[fit], train_sites[fit], protocol=protocol, device=probe_device, seed=self.seed,
                n_jobs=self.n_jobs,
            )
            notes += [f"val {p}: {q.note}" for p, q in (("age", age_probe), ("site", site_probe)) if q.note]
            vi, ve = self.split.val_internal_rows, self.split.val_external_rows
            val = self._score(
                "val",
                age_probe,
                site_probe,
                (train_X[vi], train_ages[vi], train_sites[vi]),
                (train_X[ve], train_ages[ve]),
                n_train_sites,
                fit_ages=train_ages[fit],
            )
        else:
            val = self._score("val", None, None, None, None, n_train_sites)

        if self.evaluation.test and self.test_splits:
            age_probe = fit_age_probe(train_X, train_ages, protocol=protocol, device=probe_device, n_jobs=self.n_jobs)
            site_probe = fit_site_probe(
                train_X, train_sites, protocol=protocol, device=probe_device, seed=self.seed, n_jobs=self.n_jobs
            )
            notes += [f"test {p}: {q.note}" for p, q in (("age", age_probe), ("site", site_probe)) if q.note]
            internal = external = None
            if "internal_test" in self.test_splits:
                table = self.store.table("internal_test")
                rows = table["row"].to_numpy(dtype=np.int64)
                internal = (self._features(model, "internal_test", rows, device), *self._labels(table, rows))
            if "external_test" in self.test_splits:
                table = self.store.table("external_test")
                rows = table["row"].to_numpy(dtype=np.int64)
                external = (self._features(model, "external_test", rows, device), self._labels(table, rows)[0])
            test = self._score("test", age_probe, site_probe, internal, external, len(self.store.site_labels),
                               fit_ages=train_ages)
        else:
            test = self._score("test", None, None, None, None, len(self.store.site_labels))

        return {
            **val,
            **test,
            "leaked": bool(self.leaked),
            "eval_s": time.perf_counter() - start,
            "probe_notes": "; ".join(notes),
            "protocol": protocol,
        }
