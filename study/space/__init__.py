"""The search-space YAML: a base experiment configuration plus ``search:`` and ``study:`` blocks.

A search-space file is an experiment YAML (validated by ``brainage_core.config``) with two more
top-level blocks::

    search:                                   # dotted config key -> distribution
      loss.temperature: {loguniform: [0.03, 1.0]}
      loss.threshold_margin: {uniform: [0.0, 10.0]}
      training.batch_size: {int: [16, 64]}     # inclusive bounds
      loss.kernel: {choice: [rbf, cauchy]}
      loss.sigma:                              # conditional on a searched choice
        depends_on: loss.kernel
        cases:
          rbf: {uniform: [0.5, 5.0]}           # sigma of the RBF kernel (years)
          cauchy: {loguniform: [0.01, 1.0]}    # gamma of the Cauchy kernel (1/years^2)
          # a case may also be {fixed: VALUE}; a choice value with no case keeps the base value
      loss.threshold_margin:                   # nested: the parent may itself be conditional,
        depends_on: loss.form                  # and ``when`` adds conditions on other searched keys
        when: {loss.method: [threshold]}       # (key: value or list of values; all must hold)
        cases: {paper: {uniform: [0.0, 10.0]}}
    study:
      num_samples: 20                # trials (grid: omitted or equal to the grid size)
      max_concurrent_trials: 1
      searcher: tpe                  # tpe | nsga2 | random | grid (grid: choice/int/fixed only)
      objective: val_mae_ext         # a validation metric; test_* metrics are never optimised
      mode: min                      # min | max
      # multi-objective instead of objective/mode (Pareto set -> pareto.csv/.parquet):
      # objectives: [val_mae_ext, val_bacc]; modes: [min, min] (default min for each);
      # prune_on: val_lc (the one scalar ASHA prunes on and checkpoints are ranked by; default val_lc)
      asha: {grace_period: 150, reduction_factor: 3, brackets: 1}   # or null: no early stopping
      seed: 0                        # the searcher's seed (training.seed is the trials' seed)
      resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1}
      max_failures: 2                # restarts of a failed trial / DDP worker group (bounded)
      checkpoints_to_keep: 2         # per trial, best by the objective (the latest is always kept)
      tune_loggers: true             # Tune's per-trial JSON/CSV/TensorBoard loggers (false: large studies)
      # population_size: 8           # nsga2 only: trials per generation (default: Optuna's 50)

Where each part lives: ``params.py`` the ``search:`` block (distributions, conditional parameters,
Optuna names); ``settings.py`` the ``study:`` block (its keys are a schema checked by the config's
validation engine, ``brainage_core/config/validate.py``); ``searchspace.py`` :class:`SearchSpace`,
:func:`load_search_space` / :func:`parse_search_space` and the whole-config checks of the extremes.

Contracts:

- :func:`load_search_space` returns a :class:`SearchSpace` or raises ONE
  :class:`~brainage_core.errors.ConfigError` naming the file and the full key (``search.loss.sigma``,
  ``study.asha.grace_period``...) and what was expected.
- Every searched key must exist in the experiment schema; every bound, choice value and fixed value is
  checked against that key's type and range (``brainage_core.config.check_value``), and the extreme
  configurations of each parameter are validated as whole experiment configs (cross-field rules).
- ``study.asha.grace_period`` is a multiple of ``evaluation.eval_every`` and at most
  ``training.epochs``; ``training.epochs`` is a multiple of ``evaluation.eval_every`` so that the last
  epoch is an evaluation (ASHA's ``max_t`` and the "training finished" test rely on it).
- Optuna parameter names are the dotted keys, or ``key[case]`` for a conditional parameter
  (``loss.sigma[rbf]``); :meth:`SearchSpace.overrides` maps a sampled parameter dict back to the
  dotted config values of one trial.
- A conditional parameter is active when its ``depends_on`` parameter is active, that parameter's value
  has a case, and every ``when`` condition holds; an inactive parameter is not sampled and keeps the
  base value (so method-dependent defaults of ``brainage_core.config`` apply). Every combination of
  choices (with the numeric parameters at their bounds) is validated as a whole experiment config.
"""

from brainage_core.metrics import VALIDATION_METRICS  # what a study may select on
from study.space.params import DISTRIBUTIONS, Dist, Param
from study.space.searchspace import SearchSpace, grid_points, load_search_space, parse_search_space
from study.space.settings import SEARCHERS, Asha, Resources, StudySettings

__all__ = [
    "DISTRIBUTIONS",
    "SEARCHERS",
    "VALIDATION_METRICS",
    "Dist",
    "Param",
    "Asha",
    "Resources",
    "StudySettings",
    "SearchSpace",
    "grid_points",
    "load_search_space",
    "parse_search_space",
]
