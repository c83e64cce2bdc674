"""The typed experiment configuration: YAML loading, validation and dotted overrides.

Where each part lives (every public name is importable from ``brainage_core.config``):

- ``schema.py``: the key tree (sections, keys, types, ranges, defaults) and ``field_info`` /
  ``field_type`` / ``check_value`` for dotted keys such as ``loss.temperature``;
- ``validate.py``: the validation engine (type, range and choice checks, unknown keys with the one
  did-you-mean helper, the one-line error format), which the search spaces' study block uses too;
- ``rules.py``: method-dependent defaults and the cross-field rules (the loss rules read from
  ``brainage_core/loss_registry.py``);
- ``env.py``: ``${VAR}`` expansion; ``overrides.py``: ``a.b=c`` overrides; ``tree.py``: copying,
  setting and diffing nested dicts; ``loading.py``: ``load_yaml``, ``config_from_dict``, ``load_config``.

Contracts:

- ``load_config(path, overrides=(), expand_env=True)`` reads YAML with ``yaml.safe_load``, applies
  dotted overrides ``a.b=c`` and returns an :class:`ExperimentConfig`.
- ``config_from_dict(d, source)`` validates a plain dict (missing keys take their defaults).
- Every mistake raises ONE :class:`~brainage_core.errors.ConfigError` whose message names the source
  (file path), the full dotted key path, the value found and what was expected (the closest valid key
  for an unknown key, the choices or the range for a bad value).
- ``${VAR}`` (and ``${VAR:-default}``) in string values are expanded from the environment when
  ``expand_env=True``; an unset variable is an error naming the variable and the key. With
  ``expand_env=False`` the text is kept verbatim (a study runner can validate a YAML before the
  variable is needed).
"""

from brainage_core.config.env import expand_env_vars
from brainage_core.config.loading import config_from_dict, load_config, load_yaml
from brainage_core.config.overrides import apply_overrides, parse_override
from brainage_core.config.schema import (
    BACKBONES,
    CONTRASTIVE_LOSS_METHODS,
    FORM_METHODS,
    GRIDS,
    HEADS,
    KERNEL_METHODS,
    KERNELS,
    LOSS_METHODS,
    PROBE_PROTOCOLS,
    SUPERVISED_LOSS_METHODS,
    AugmentConfig,
    DataConfig,
    EvaluationConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    SyntheticConfig,
    TrainingConfig,
    check_value,
    field_info,
    field_type,
)
from brainage_core.config.tree import config_differences, plain_copy
from brainage_core.config.validate import FieldInfo

# the public names (schema.py has no __all__ of its own: this is the one list); split_override,
# override_value and set_dotted stay in their modules (helpers of study/space)
__all__ = [
    "plain_copy",
    "config_differences",
    "BACKBONES",
    "HEADS",
    "LOSS_METHODS",
    "CONTRASTIVE_LOSS_METHODS",
    "SUPERVISED_LOSS_METHODS",
    "KERNEL_METHODS",
    "FORM_METHODS",
    "KERNELS",
    "GRIDS",
    "PROBE_PROTOCOLS",
    "SyntheticConfig",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "AugmentConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FieldInfo",
    "load_config",
    "load_yaml",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "expand_env_vars",
    "field_type",
    "field_info",
    "check_value",
]
