"""The validation split used for model selection, carved from the ``train`` split.

Like the challenge kit's folds: an *external* part made of whole sites held out (sites never seen in
training) and an *internal* part, a site-stratified sample of the remaining subjects (each of its sites
keeps subjects in training). The sizes are fractions of the whole train split: about
``external_frac`` · N subjects (whole sites, so only approximately) and ``internal_frac`` · N subjects.
The split is a pure function of the table and the seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from brainage_core.config import EvaluationConfig
from brainage_core.errors import DataError

#: the split's defaults are the experiment config's (``evaluation.val_internal_frac`` / ``val_external_frac``
#: / ``val_seed``), read here so that no caller copies the numbers
_DEFAULTS = EvaluationConfig()


@dataclass(frozen=True)
class ValidationSplit:
    """Rows of the train array (sorted int64 arrays, pairwise disjoint, covering the table).

    ``external_sites``: the held-out site labels (sorted).
    """

    train_rows: np.ndarray
    val_internal_rows: np.ndarray
    val_external_rows: np.ndarray
    external_sites: tuple[str, ...]


def _check_table(table: pd.DataFrame, internal_frac: float, external_frac: float) -> None:
    missing = [c for c in ("site", "row") if c not in table.columns]
    if missing:
        raise DataError(f"make_validation_split: the train table lacks column(s) {', '.join(missing)}")
    for name, value in (("internal_frac", internal_frac), ("external_frac", external_frac)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"make_validation_split: {name} = {value}; expected a fraction in [0, 1)")
    if internal_frac + external_frac >= 1.0:
        raise DataError(
            f"make_validation_split: internal_frac + external_frac = {internal_frac + external_frac}; expected < 1"
        )
    if table["row"].duplicated().any():
        row = table.loc[table["row"].duplicated(), "row"].iloc[0]
        raise DataError(f"make_validation_split: row {row} appears twice in the train table; expected unique rows")


def _pick_external_sites(sizes: pd.Series, target: float, rng: np.random.Generator) -> list[str]:
    """Whole sites, in a seeded random order, kept when they bring the total closer to ``target``."""
    labels = sizes.index.to_numpy()
    chosen: list[str] = []
    total = 0
    for i in rng.permutation(labels.size):
        size = int(sizes.iloc[i])
        if len(chosen) + 1 >= labels.size:  # at least one site stays in training
            break
        if abs(total + size - target) < abs(total - target):
            chosen.append(str(labels[i]))
            total += size
    if not chosen:  # every site is larger than twice the target: take the smallest (first of ties at random)
        smallest = sizes[sizes == sizes.min()].index.to_numpy()
        chosen.append(str(smallest[rng.integers(smallest.size)]))
    return chosen


def _stratified_sample(sites: np.ndarray, n_take: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (into ``sites``) of ``n_take`` subjects, allocated to sites in proportion to their size
    (largest remainders, ties broken at random), leaving every site at least one subject."""
    labels, inverse, counts = np.unique(sites, return_inverse=True, return_counts=True)
    capacity = counts - 1
    n_take = min(n_take, int(capacity.sum()))
    quota = n_take * counts / counts.sum()
    alloc = np.minimum(np.floor(quota).astype(np.int64), capacity)
    remainder = quota - np.floor(quota)
    while alloc.sum() < n_take:
        free = alloc < capacity
        # largest remainder first; random tie-breaking; sites at capacity excluded
        keys = np.where(free, remainder + rng.random(labels.size) * 1e-9, -np.inf)
        best = int(np.argmax(keys))
        alloc[best] += 1
        remainder[best] = -1.0 if remainder[best] >= 0 else remainder[best] - 1.0
    picked = []
    for s in range(labels.size):
        members = np.flatnonzero(inverse == s)
        if alloc[s]:
            picked.append(rng.choice(members, size=int(alloc[s]), replace=False))
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def make_validation_split(
    train_table: pd.DataFrame,
    *,
    internal_frac: float = _DEFAULTS.val_internal_frac,
    external_frac: float = _DEFAULTS.val_external_frac,
    seed: int = _DEFAULTS.val_seed,
) -> ValidationSplit:
    """Split the ``train`` table (columns ``site``, ``row``) into training / internal / external validation.

    External: whole sites totalling about ``external_frac`` · N subjects (at least one site when
    ``external_frac`` > 0; never every site). Internal: round(``internal_frac`` · N) subjects of the remaining
    sites, stratified by site, each site keeping at least one subject in training (so sites with a single
    remaining subject never appear in it). Deterministic for a given table content and ``seed``.
    """
    _check_table(train_table, internal_frac, external_frac)
    table = train_table.sort_values("row", kind="stable")
    sites = table["site"].astype(str).to_numpy()
    rows = table["row"].to_numpy(dtype=np.int64)
    n = rows.size
    rng = np.random.default_rng(seed)
    sizes = pd.Series(sites).value_counts().sort_index()
    external_sites: list[str] = []
    if external_frac > 0:
        if sizes.size < 2:
            raise DataError(
                f"make_validation_split: the train split has {sizes.size} site(s); holding out whole sites as "
                "external validation needs at least 2 (set evaluation.val_external_frac: 0)"
            )
        external_sites = _pick_external_sites(sizes, external_frac * n, rng)
    is_external = np.isin(sites, external_sites)
    remaining = np.flatnonzero(~is_external)
    internal_pos = np.zeros(0, dtype=np.int64)
    if internal_frac > 0:
        internal_pos = remaining[_stratified_sample(sites[remaining], round(internal_frac * n), rng)]
    is_internal = np.zeros(n, dtype=bool)
    is_internal[internal_pos] = True
    return ValidationSplit(
        train_rows=np.sort(rows[~is_external & ~is_internal]),
        val_internal_rows=np.sort(rows[is_internal]),
        val_external_rows=np.sort(rows[is_external]),
        external_sites=tuple(sorted(external_sites)),
    )


def validation_split_of(
    train_table: pd.DataFrame, evaluation: EvaluationConfig | Mapping[str, Any] | None
) -> ValidationSplit:
    """:func:`make_validation_split` with the settings of an experiment's ``evaluation`` section: the
    validated :class:`~brainage_core.config.EvaluationConfig`, or its plain dict (a checkpoint's config),
    where a missing key takes the config's default."""
    if not isinstance(evaluation, EvaluationConfig):
        section = dict(evaluation or {})
        keys = ("val_internal_frac", "val_external_frac", "val_seed")
        evaluation = {k: section.get(k, getattr(_DEFAULTS, k)) for k in keys}
    else:
        evaluation = {k: getattr(evaluation, k) for k in ("val_internal_frac", "val_external_frac", "val_seed")}
    return make_validation_split(train_table, internal_frac=float(evaluation["val_internal_frac"]),
                                 external_frac=float(evaluation["val_external_frac"]),
                                 seed=int(evaluation["val_seed"]))
