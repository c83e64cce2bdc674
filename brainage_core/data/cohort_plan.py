"""The per-site structure of the synthetic cohort: who is scanned where, at what age, in which split.

The real OpenBHB figures (64 ``siteXacq`` sites, per-split counts, age quantiles, share of women,
field strength, study) ship as package data in ``site_stats.json``, measured on the public OpenBHB
release (``docs/synthetic-cohort.md``, "Who is scanned where").

:func:`plan_cohort` turns them into a *plan*: one row per subject with its participant id, age, sex,
site and split — everything the participants table holds except the volume figures, which
:mod:`brainage_core.data.synthetic` derives per subject. The plan is a pure function of its
arguments (the randomness comes from ``numpy.random.SeedSequence([seed, PLAN_STREAM])``).

Ages: each site's age distribution is the piecewise-linear quantile function through the real
(min, q25, median, q75, max). ``age_confound`` blends it with the pooled cohort's quantile function
(1 = the real per-site ages, 0 = every site draws from the same, pooled distribution). Quantile
levels are stratified per site, so a site's generated ages match its real quantiles closely.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd

from brainage_core.data.layout import PARTICIPANTS_COLUMNS, VOLUME_COLUMNS
from brainage_core.errors import ConfigError

#: Split names, in plan order (their folders: brainage_core.data.layout.SPLIT_FOLDERS).
SPLITS: tuple[str, ...] = ("train", "internal_test", "external_test")
_COUNT_KEYS: dict[str, str] = {"train": "n_train", "internal_test": "n_internal", "external_test": "n_external"}

#: Real OpenBHB public totals, per split.
REAL_TOTALS: dict[str, int] = {"train": 3227, "internal_test": 362, "external_test": 395}
#: The six sites (siteXacq) that appear only in external_test.
EXTERNAL_SITES: tuple[int, ...] = (13, 15, 31, 48, 57, 59)

#: Seed-sequence stream keys: every random draw of the generator uses ``[seed, STREAM, ...]``.
PLAN_STREAM = 0
SITE_STREAM = 1
SUBJECT_STREAM = 2

#: participant_id of plan row i is ``str(ID_OFFSET + i)`` (numeric, no leading zeros).
ID_OFFSET = 100000

#: the participants.tsv columns but the volume figures, then the plan row index
PLAN_COLUMNS: tuple[str, ...] = (*(c for c in PARTICIPANTS_COLUMNS if c not in VOLUME_COLUMNS), "index")

_QUANTILE_LEVELS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_QUANTILE_KEYS = ("age_min", "age_q25", "age_median", "age_q75", "age_max")


@lru_cache(maxsize=1)
def load_site_stats() -> pd.DataFrame:
    """The real per-site figures, one row per siteXacq (sorted), from the packaged ``site_stats.json``.

    Adds ``n_total`` (all splits) and ``acquisition_setting`` (1-based rank of the siteXacq among the
    sites sharing the same raw ``site``).
    """
    text = resources.files("brainage_core.data").joinpath("site_stats.json").read_text()
    stats = pd.DataFrame(json.loads(text)).sort_values("siteXacq").reset_index(drop=True)
    stats["n_total"] = stats["n_train"] + stats["n_internal"] + stats["n_external"]
    stats["acquisition_setting"] = stats.groupby("site")["siteXacq"].rank(method="first").astype(int)
    return stats


def site_quantiles(stats_row: pd.Series) -> np.ndarray:
    """The five real age quantiles (min, q25, median, q75, max) of one site, in years."""
    return np.array([float(stats_row[k]) for k in _QUANTILE_KEYS])


def _site_quantile(q: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.interp(u, _QUANTILE_LEVELS, q)


@lru_cache(maxsize=1)
def _pooled_quantile_table() -> tuple[np.ndarray, np.ndarray]:
    """(levels, ages) of the pooled real cohort's quantile function (a mixture weighted by site size)."""
    stats = load_site_stats()
    grid = (np.arange(2000) + 0.5) / 2000
    ages, weights = [], []
    for _, row in stats.iterrows():
        ages.append(_site_quantile(site_quantiles(row), grid))
        weights.append(np.full(grid.size, row["n_total"] / grid.size))
    a, w = np.concatenate(ages), np.concatenate(weights)
    order = np.argsort(a, kind="stable")
    a, w = a[order], w[order]
    levels = (np.cumsum(w) - 0.5 * w) / w.sum()
    return levels, a


def pooled_quantile(u: np.ndarray) -> np.ndarray:
    """Quantile function of the whole real cohort's ages at levels ``u`` in [0, 1] (years)."""
    levels, ages = _pooled_quantile_table()
    return np.interp(u, levels, ages)


def site_counts(*, subjects: int | None = None, full: bool = False, sites: int | None = None) -> pd.DataFrame:
    """Subjects per site and split: columns ``siteXacq``, ``train``, ``internal_test``, ``external_test``.

    ``full``: the real counts. ``subjects=N``: the real counts scaled by N / (real total of the kept
    sites), rounded, with at least one subject in every site × split the real set fills (so the total
    is only approximately N). ``sites=K`` (≥ 2) keeps the K − 1 largest internal sites and the largest
    external one. Exactly one of ``full`` and ``subjects`` must be given.
    """
    if full == (subjects is not None):
        raise ConfigError(
            f"synthetic cohort size: give exactly one of subjects=N or full=True (got subjects={subjects!r}, "
            f"full={full!r})"
        )
    stats = load_site_stats()
    if sites is not None:
        if int(sites) < 2:
            raise ConfigError(f"synthetic.sites={sites!r}: expected an integer ≥ 2 (internal sites + 1 external)")
        internal = stats[stats["n_external"] == 0].sort_values(["n_total", "siteXacq"], ascending=[False, True])
        external = stats[stats["n_external"] > 0].sort_values(["n_total", "siteXacq"], ascending=[False, True])
        keep = list(internal["siteXacq"].iloc[: int(sites) - 1]) + [int(external["siteXacq"].iloc[0])]
        stats = stats[stats["siteXacq"].isin(keep)].reset_index(drop=True)
    real = stats[[_COUNT_KEYS[s] for s in SPLITS]].to_numpy()
    if full:
        counts = real.copy()
    else:
        if int(subjects) < 1:
            raise ConfigError(f"synthetic.subjects={subjects!r}: expected a positive number of subjects")
        scaled = np.rint(real * (int(subjects) / real.sum())).astype(int)
        counts = np.where(real > 0, np.maximum(scaled, 1), 0)
    table = pd.DataFrame(counts, columns=list(SPLITS))
    table.insert(0, "siteXacq", stats["siteXacq"].to_numpy())
    return table


def plan_cohort(
    *,
    subjects: int | None = None,
    full: bool = False,
    sites: int | None = None,
    age_confound: float = 1.0,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per subject, in generation order (site by site, then split by split).

    Columns: :data:`PLAN_COLUMNS` — ``participant_id`` (str, ``ID_OFFSET + index``), ``study`` (int),
    ``sex`` ("female"/"male"), ``age`` (years, 2 decimals), ``site`` (the raw site, int),
    ``diagnosis`` ("control"), ``magnetic_field_strength`` (tesla), ``acquisition_setting`` (int),
    ``siteXacq`` (int, the challenge label), ``split``, ``index`` (the row number; with ``seed`` it
    determines every random draw of the subject's volume).
    """
    if not 0.0 <= float(age_confound) <= 1.0:
        raise ConfigError(f"synthetic.age_confound={age_confound!r}: expected a number in [0, 1]")
    counts = site_counts(subjects=subjects, full=full, sites=sites)
    stats = load_site_stats().set_index("siteXacq")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), PLAN_STREAM]))
    c = float(age_confound)
    blocks = []
    for _, count_row in counts.iterrows():
        sx = int(count_row["siteXacq"])
        info = stats.loc[sx]
        n = int(sum(count_row[s] for s in SPLITS))
        if n == 0:
            continue
        # Stratified quantile levels: one per 1/n slice, shuffled so that splits get similar ages.
        u = (rng.permutation(n) + rng.random(n)) / n
        age = c * _site_quantile(site_quantiles(info), u) + (1.0 - c) * pooled_quantile(u)
        n_female = int(round(float(info["frac_female"]) * n))
        female = np.zeros(n, bool)
        female[rng.permutation(n)[:n_female]] = True
        split = np.repeat(np.array(SPLITS, dtype=object), [int(count_row[s]) for s in SPLITS])
        blocks.append(
            pd.DataFrame(
                {
                    "study": int(info["study"]),
                    "sex": np.where(female, "female", "male"),
                    "age": np.round(age, 2),
                    "site": int(info["site"]),
                    "diagnosis": "control",
                    "magnetic_field_strength": float(info["field_T"]),
                    "acquisition_setting": int(info["acquisition_setting"]),
                    "siteXacq": sx,
                    "split": split,
                }
            )
        )
    plan = pd.concat(blocks, ignore_index=True)
    plan["index"] = np.arange(len(plan))
    plan.insert(0, "participant_id", [str(ID_OFFSET + i) for i in range(len(plan))])
    return plan[list(PLAN_COLUMNS)]
