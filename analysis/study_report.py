# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Study report
#
# What the hyper-parameter search found: internal and external MAE, site balanced accuracy (BAcc, lower
# is better: it measures how much site information the representation leaks), the challenge score
# Lc = MAE_ext · BAcc^0.3, which hyper-parameters matter, and how the results sit next to the published
# OpenBHB figures. Selection uses validation metrics only (`val_*`); test metrics (`test_*`) are
# reported, never optimised. Run headlessly with `python analysis/report.py STUDY_DIR … --out report.html`.

# %%
import warnings

import pandas as pd
from IPython.display import Markdown, display

from analysis.figures import epoch_figure, importance_figure, pareto_figure, reference_figure, show_figure
from analysis.loader import best_rows, load_studies
from analysis.reference import REFERENCE_SOURCE, reference_table
from analysis.tables import (
    baseline_levels,
    comparison_table,
    leaderboard,
    metrics_by_epoch,
    optuna_importances,
    pareto_front,
    seed_summary,
    seed_table_wide,
    smoke_verdict,
    status_counts,
    study_overview,
    style_leaderboard,
)

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto, imported by optuna
pd.set_option("display.max_columns", 60)
pd.set_option("display.width", 200)

# %% tags=["parameters"]
# Parameters (report.py injects a cell after this one).
study_dirs: list[str] = []
metric = "val_lc"
top = 30

# %%
results = load_studies(study_dirs)
display(Markdown("**Studies:** " + ", ".join(f"`{d}`" for d in study_dirs)))
display(study_overview(results))
display(status_counts(results))

# %% [markdown]
# ## Leaderboard
#
# One row per finished trial, at its best evaluation by the selection metric. Each MAE is followed by its
# constant baseline (`*_const`: predicting the training rows' median age for everyone) and each BAcc by
# its chance level (`*_bacc_chance`: 1 / the sites of the cohort's scored part); `beats_const` says
# whether the trial is below the baseline on both validation MAEs. Rows whose training set included
# test subjects are `leaked`: their test cells are struck through and must not be quoted.

# %%
verdict = smoke_verdict(results, metric)
if verdict.smoke:
    display(Markdown(f"**{verdict.message}**"))
elif verdict.n_beating is not None:
    display(Markdown(f"{verdict.n_beating} of {verdict.n_trials} trial(s) below the constant baseline on both "
                     "validation MAEs."))
board = leaderboard(results, metric, top=top)
display(Markdown(f"Ranked by `{metric}` (lower is better); {len(board)} trial(s) shown."))
display(style_leaderboard(board))
if board["leaked"].any():
    display(Markdown(f"**{int(board['leaked'].sum())} leaked row(s)**: test metrics of runs trained on test subjects."))

# %% [markdown]
# ## Pareto front: external MAE against site BAcc
#
# Both are minimised; a trial is on the front when no other trial is at least as good on both.

# %%
best = best_rows(results, metric)
front = pareto_front(best, "val_mae_ext", "val_bacc")
show_figure(pareto_figure(best, front, "val_mae_ext", "val_bacc"))
display(front[["study", "trial_id", "method", "epoch", "val_mae_ext", "val_bacc", "val_lc"]].reset_index(drop=True))

# %% [markdown]
# ## Hyper-parameter importances (Optuna, fANOVA)

# %%
importances = [imp for d in study_dirs for imp in optuna_importances(d)]
for imp in importances:
    if imp.reason:
        display(Markdown(f"*{imp.study}*: importances not available — {imp.reason}."))
if any(len(imp.table) for imp in importances):
    show_figure(importance_figure(importances))
    display(pd.concat([imp.table for imp in importances if len(imp.table)], ignore_index=True))

# %% [markdown]
# ## Metrics against epoch

# %%
show_figure(epoch_figure(metrics_by_epoch(results), baseline_levels(results)))

# %% [markdown]
# ## Seeds: means and 95 % confidence intervals

# %%
seeds = seed_summary(results, metric)
if seeds.message:
    display(Markdown(f"**Note:** {seeds.message}."))
display(seed_table_wide(seeds))

# %% [markdown]
# ## Published reference figures
#
# The published numbers are **OpenBHB private-test** figures (server-side test set, ResNet-18 on VBM
# unless noted). They are shown beside this study's numbers, not mixed with them: numbers measured on the
# synthetic cohort or on the public test splits are not comparable with them.

# %%
reference = reference_table()
comparison = comparison_table(results, reference, metric)
display(Markdown(f"Reference rows: *{REFERENCE_SOURCE}*."))
display(comparison)
show_figure(reference_figure(comparison[comparison["split"] != "OpenBHB private test"], reference))
