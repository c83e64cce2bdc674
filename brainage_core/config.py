"""The typed experiment configuration: YAML loading, validation and dotted overrides.

The schema is the one pinned in ``docs/interfaces.md`` ("The experiment YAML"); the defaults are the
paper's recipe (ResNet-18, y-aware loss with an RBF kernel, Adam lr 1e-4, step decay x0.9 every 10
epochs, batch 32, 2 views, 300 epochs).

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
- ``field_type(key)`` / ``field_info(key)`` / ``check_value(key, value)`` let a search space refer to
  dotted keys such as ``loss.temperature`` and have them checked against this schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from brainage_core import loss_registry
from brainage_core.errors import ConfigError

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

# The model names mirror brainage_core.models (the config must be usable, and its errors precise,
# without importing torch); tests check that they agree. The loss methods and their parameters come
# from brainage_core.loss_registry (torch-free), which brainage_core.losses reads too.
BACKBONES = ("resnet18", "resnet34", "resnet50", "densenet121", "alexnet3d")
HEADS = ("contrastive", "regression")
CONTRASTIVE_LOSS_METHODS = loss_registry.CONTRASTIVE_METHODS
SUPERVISED_LOSS_METHODS = loss_registry.SUPERVISED_METHODS
LOSS_METHODS = loss_registry.LOSS_METHODS
KERNEL_METHODS = loss_registry.KERNEL_METHODS  # methods that need loss.kernel
FORM_METHODS = loss_registry.FORM_METHODS  # methods that accept loss.form
KERNELS = loss_registry.KERNELS
GRIDS = ("full", "3mm", "6mm")
PROBE_PROTOCOLS = ("exact", "fast")  # brainage_core.evaluation.probes.PROTOCOLS


def _spec(
    *,
    choices: Sequence[Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> dict[str, Any]:
    """Field metadata: allowed choices and/or numeric bounds (gt/ge/lt/le)."""
    return {"choices": tuple(choices) if choices is not None else None, "gt": gt, "ge": ge, "lt": lt, "le": le}


def _f(default: Any, **spec: Any) -> Any:
    return field(default=default, metadata=_spec(**spec))


# --------------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """A synthetic cohort to generate (``brainage_core.data.synthetic.generate_cohort``)."""

    subjects: int | None = _f(300, ge=2)  # None with full=True means the real split sizes
    sites: int | None = _f(None, ge=2)  # None: the 64 OpenBHB sites
    strength: float = _f(1.5, ge=0.0)
    age_confound: float = _f(1.0, ge=0.0, le=1.0)
    seed: int = _f(0, ge=0)


@dataclass
class DataConfig:
    """Where the subjects come from and the prepared store they are read from."""

    store: str | None = _f(None)
    source: str | None = _f(None)
    layout: str = _f("openbhb", choices=("openbhb", "ramp", "nifti"))
    modality: str = _f("vbm", choices=("vbm", "quasiraw"))
    grid: str = _f("full", choices=GRIDS)
    mask: str | None = _f(None)
    resample: bool = _f(False)
    on_error: str = _f("raise", choices=("raise", "skip"))
    synthetic: SyntheticConfig | None = _f(None)


@dataclass
class ModelConfig:
    """Backbone and head (``brainage_core.models.build_model``).

    ``feature`` chooses what a contrastive model hands to the probes; a regression model always hands
    its encoder output (``feature`` defaults to ``encoder`` for it).
    """

    backbone: str = _f("resnet18", choices=BACKBONES)
    head: str = _f("contrastive", choices=HEADS)
    base_width: int = _f(64, ge=1)
    feature: str = _f("projection", choices=("projection", "encoder"))
    sync_batchnorm: bool = _f(False)
    channels_last: bool = _f(False)
    compile: bool = _f(False)


@dataclass
class LossConfig:
    """The loss (``brainage_core.losses.build_loss``); see ``docs/losses.md``.

    ``kernel`` defaults to ``rbf`` for the methods that need one (yaware, threshold, expw) and to
    None for the others; ``form`` None means the method's default (``reference``);
    ``temperature`` None means the method's default (0.1, or 2.0 for rnc).
    """

    method: str = _f("yaware", choices=LOSS_METHODS)
    kernel: str | None = _f("rbf", choices=KERNELS)
    sigma: float = _f(loss_registry.DEFAULT_SIGMA, gt=0.0)
    temperature: float | None = _f(0.1, gt=0.0)
    base_temperature: float = _f(0.07, gt=0.0)
    form: str | None = _f(None, choices=loss_registry.FORMS)
    delta_reduction: str = _f("sum", choices=loss_registry.DELTA_REDUCTIONS)
    threshold_margin: float = _f(0.0, ge=0.0)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_loss(method, **kwargs)`` holding only what the method takes
        (``brainage_core.loss_registry.LossMethod.parameters``)."""
        return {name: getattr(self, name) for name in loss_registry.method_info(self.method).parameters}


@dataclass
class OptimizerConfig:
    name: str = _f("adam", choices=("adam", "sgd"))
    lr: float = _f(1.0e-4, gt=0.0)
    weight_decay: float = _f(5.0e-5, ge=0.0)
    momentum: float = _f(0.9, ge=0.0, lt=1.0)  # SGD only


@dataclass
class ScheduleConfig:
    """``step``: lr x rate every ``step_every`` epochs; ``cosine``: down to lr*rate^3; ``none``."""

    name: str = _f("step", choices=("step", "cosine", "none"))
    step_every: int = _f(10, ge=1)
    rate: float = _f(0.9, gt=0.0, le=1.0)
    warmup_epochs: int = _f(0, ge=0)


@dataclass
class AugmentConfig:
    crop: bool = _f(False)
    cutout: bool = _f(False)
    zscore: bool = _f(False)


@dataclass
class TrainingConfig:
    epochs: int = _f(300, ge=1)
    batch_size: int = _f(32, ge=1)
    views: int = _f(2, ge=1)
    bf16: bool = _f(False)
    grad_clip: float | None = _f(None, gt=0.0)
    seed: int = _f(0, ge=0)
    loader_workers: int = _f(2, ge=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    train_on: str = _f("train_minus_val", choices=("train_minus_val", "train", "all"))
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata=_spec())


@dataclass
class EvaluationConfig:
    eval_every: int = _f(10, ge=1)
    val_internal_frac: float = _f(0.09, ge=0.0, lt=1.0)
    val_external_frac: float = _f(0.10, ge=0.0, lt=1.0)
    val_seed: int = _f(0, ge=0)
    batch_size: int = _f(32, ge=1)
    test: bool = _f(True)
    # Probe protocol (docs/probes.md): "fast" for the evaluations during training (selection, ASHA),
    # final_protocol for the last evaluation of a run, study/final.py and the probes of study/export.py.
    protocol: str = _f("fast", choices=PROBE_PROTOCOLS)
    final_protocol: str = _f("exact", choices=PROBE_PROTOCOLS)


@dataclass
class ExperimentConfig:
    """One experiment: every section of the YAML schema, validated."""

    data: DataConfig = field(default_factory=DataConfig, metadata=_spec())
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_spec())
    loss: LossConfig = field(default_factory=LossConfig, metadata=_spec())
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata=_spec())
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata=_spec())
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata=_spec())
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata=_spec())

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML/JSON-safe) that ``config_from_dict`` turns back into this config."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Schema introspection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """What the schema says about one dotted key.

    ``type`` is the base type (``int``, ``float``, ``bool``, ``str`` or a section dataclass);
    ``optional`` whether null is allowed; ``choices``/bounds as validated.
    """

    key: str
    type: type
    optional: bool
    default: Any
    choices: tuple[Any, ...] | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.type)

    def expected(self) -> str:
        """Human-readable statement of the accepted values, used in error messages."""
        if self.is_section:
            text = f"a mapping with keys {', '.join(_field_names(self.type))}"
        elif self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.type]
            bounds = []
            if self.gt is not None:
                bounds.append(f"> {self.gt:g}")
            if self.ge is not None:
                bounds.append(f">= {self.ge:g}")
            if self.lt is not None:
                bounds.append(f"< {self.lt:g}")
            if self.le is not None:
                bounds.append(f"<= {self.le:g}")
            if bounds:
                text += " " + " and ".join(bounds)
        if self.optional:
            text += " (or null)"
        return text


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _unwrap(annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``float`` -> (float, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:  # pragma: no cover - the schema has no such field
            raise TypeError(f"unsupported annotation {annotation!r}")
        return args[0], True
    return annotation, False


def _info(cls: type, name: str, prefix: str) -> FieldInfo:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    base, optional = _unwrap(_hints(cls)[name])
    default = f.default if f.default is not dataclasses.MISSING else None
    meta = dict(f.metadata)
    return FieldInfo(key=f"{prefix}{name}", type=base, optional=optional, default=default, **meta)


def _suggest(name: str, options: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'loss.temperature'?"`` for the closest option (difflib), or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def field_info(dotted_key: str, *, source: str | None = None) -> FieldInfo:
    """The schema entry for ``dotted_key`` (e.g. ``loss.temperature``, ``data.synthetic.subjects``).

    Raises ConfigError naming the first unknown component and the closest valid key.
    """
    if not isinstance(dotted_key, str) or not dotted_key or any(not p for p in dotted_key.split(".")):
        raise ConfigError(f"{_where(source)}invalid key {dotted_key!r}: expected a dotted path like 'loss.sigma'")
    cls: type = ExperimentConfig
    parts = dotted_key.split(".")
    info: FieldInfo | None = None
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        prefix = prefix + "." if prefix else ""
        if info is not None and not info.is_section:
            raise ConfigError(
                f"{_where(source)}unknown key '{dotted_key}': '{info.key}' is a value ({info.expected()}), "
                f"not a section"
            )
        names = _field_names(cls)
        if part not in names:
            raise ConfigError(
                f"{_where(source)}unknown key '{prefix}{part}'{_suggest(part, names, prefix)} "
                f"(valid keys{' of ' + prefix[:-1] if prefix else ''}: {', '.join(names)})"
            )
        info = _info(cls, part, prefix)
        if info.is_section:
            cls = info.type
    assert info is not None
    return info


def field_type(dotted_key: str) -> type:
    """The base type of a dotted key (int, float, bool, str, or a section dataclass); ConfigError if unknown."""
    return field_info(dotted_key).type


# --------------------------------------------------------------------------------------------------
# Value checking
# --------------------------------------------------------------------------------------------------


def _fail(source: str | None, key: str, value: Any, info: FieldInfo, why: str = "") -> ConfigError:
    shown = repr(value) if not isinstance(value, str) else f"'{value}'"
    return ConfigError(f"{_where(source)}{key} = {shown}{why}: expected {info.expected()}")


def _convert_scalar(value: Any, info: FieldInfo, key: str, source: str | None) -> Any:
    t = info.type
    if t is bool:
        if isinstance(value, bool):
            return value
        raise _fail(source, key, value, info)
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, value, info)
        out: Any = value
    elif t is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string: accept numeric text.
            try:
                value_f = float(value)
            except ValueError:
                raise _fail(source, key, value, info) from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(source, key, value, info)
        else:
            value_f = float(value)
        if not math.isfinite(value_f):
            raise _fail(source, key, value, info, " is not finite")
        out = value_f
    elif t is str:
        if not isinstance(value, str):
            raise _fail(source, key, value, info)
        out = value
    else:  # pragma: no cover - the schema has no other scalar types
        raise TypeError(t)
    if info.choices is not None and out not in info.choices:
        raise ConfigError(
            f"{_where(source)}{key} = '{out}': expected {info.expected()}{_suggest(str(out), map(str, info.choices))}"
        )
    if t in (int, float):
        if (
            (info.gt is not None and not out > info.gt)
            or (info.ge is not None and not out >= info.ge)
            or (info.lt is not None and not out < info.lt)
            or (info.le is not None and not out <= info.le)
        ):
            raise _fail(source, key, value, info, " is out of range")
    return out


def check_value(dotted_key: str, value: Any, *, source: str | None = None) -> Any:
    """Validate one value for ``dotted_key`` and return it converted (e.g. int 2 -> 2.0 for a float key).

    Section keys accept a mapping (validated) or null where the section is optional.
    """
    info = field_info(dotted_key, source=source)
    return _check(info, value, dotted_key, source)


def _check(info: FieldInfo, value: Any, key: str, source: str | None) -> Any:
    if value is None:
        if info.optional:
            return None
        raise _fail(source, key, value, info)
    if info.is_section:
        if not isinstance(value, Mapping):
            raise _fail(source, key, value, info)
        return _build(info.type, value, key + ".", source)
    return _convert_scalar(value, info, key, source)


def _build(cls: type, d: Mapping[str, Any], prefix: str, source: str | None) -> Any:
    names = _field_names(cls)
    for k in d:
        if not isinstance(k, str) or k not in names:
            where = f" of {prefix[:-1]}" if prefix else ""
            raise ConfigError(
                f"{_where(source)}unknown key '{prefix}{k}'{_suggest(str(k), names, prefix)} (valid keys{where}: "
                f"{', '.join(names)})"
            )
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        kwargs[name] = _check(_info(cls, name, prefix), d[name], prefix + name, source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Environment variables
# --------------------------------------------------------------------------------------------------

_ENV_PATTERN = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand_string(text: str, key: str, source: str | None, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        name, has_default, default = body.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"{_where(source)}{key} = '{text}': invalid environment reference '${{{body}}}' "
                f"(expected ${{NAME}} or ${{NAME:-default}})"
            )
        if name in environ:
            return environ[name]
        if has_default:
            return default
        raise ConfigError(
            f"{_where(source)}{key} = '{text}': environment variable {name} is not set "
            f"(set it, e.g. export {name}=/path, or override {key}=...)"
        )

    return _ENV_PATTERN.sub(replace, text)


def expand_env_vars(
    d: Any, *, source: str | None = None, environ: Mapping[str, str] | None = None, _prefix: str = ""
) -> Any:
    """A copy of ``d`` with ``${VAR}`` / ``${VAR:-default}`` expanded in every string value.

    ConfigError naming the variable and the key when a variable is unset and has no default.
    """
    env = os.environ if environ is None else environ
    if isinstance(d, Mapping):
        return {k: expand_env_vars(v, source=source, environ=env, _prefix=f"{_prefix}{k}.") for k, v in d.items()}
    if isinstance(d, list):
        return [expand_env_vars(v, source=source, environ=env, _prefix=_prefix) for v in d]
    if isinstance(d, str):
        return _expand_string(d, _prefix[:-1] or "<value>", source, env)
    return d


# --------------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------------


def _defaults_for_method(d: dict[str, Any]) -> dict[str, Any]:
    """Method-dependent defaults, applied only to keys the user left out.

    ``loss.kernel`` defaults to null for methods that take no kernel, ``loss.temperature`` to 2.0 for
    rnc (losses.md); ``model.head`` to the head the
    method trains (regression for l1/mse) and ``model.feature`` to ``encoder`` for a regression head.
    Explicit contradictory values stay and fail the cross-field checks with a clear message.
    """
    d = dict(d)
    loss = d.get("loss")
    method = loss.get("method") if isinstance(loss, Mapping) else None
    if method is None or not isinstance(method, str):
        return d
    loss = dict(loss)
    if "kernel" not in loss and method not in KERNEL_METHODS:
        loss["kernel"] = None
    info = loss_registry.METHODS.get(method)
    if "temperature" not in loss and info is not None and info.default_temperature is not None:
        loss["temperature"] = info.default_temperature  # 2.0 for rnc, the field's 0.1 for the others
    d["loss"] = loss
    raw_model = d.get("model", {})
    if not isinstance(raw_model, Mapping):  # left for the type check to report
        return d
    model = dict(raw_model)
    if "head" not in model and method in SUPERVISED_LOSS_METHODS:
        model["head"] = "regression"
    if "feature" not in model and model.get("head") == "regression":
        model["feature"] = "encoder"
    if model or "model" in d:
        d["model"] = model
    return d


def _check_cross_fields(cfg: ExperimentConfig, source: str | None) -> None:
    where = _where(source)
    loss = cfg.loss
    if loss.method in KERNEL_METHODS and loss.kernel is None:
        raise ConfigError(
            f"{where}loss.kernel = null: loss.method '{loss.method}' needs a kernel: expected one of "
            f"{', '.join(KERNELS)}"
        )
    if loss.method not in KERNEL_METHODS and loss.kernel is not None:
        raise ConfigError(
            f"{where}loss.kernel = '{loss.kernel}': loss.method '{loss.method}' takes no kernel "
            f"(only {', '.join(KERNEL_METHODS)} do): expected null"
        )
    if loss.form is not None and loss.method not in FORM_METHODS:
        raise ConfigError(
            f"{where}loss.form = '{loss.form}': only loss.method {' or '.join(FORM_METHODS)} has a form, "
            f"not '{loss.method}': expected null"
        )
    if loss.threshold_margin != 0.0 and not loss_registry.margin_applies(loss.method, loss.form):
        raise ConfigError(
            f"{where}loss.threshold_margin = {loss.threshold_margin:g}: a margin applies only to "
            f"loss.method 'threshold' with loss.form 'paper' (found method '{loss.method}', form "
            f"{loss.form!r}): expected 0"
        )
    if loss.method == "expw" and loss.kernel == "gaussian" and loss.sigma < loss_registry.MIN_EXPW_GAUSSIAN_SIGMA:
        raise ConfigError(
            f"{where}loss.sigma = {loss.sigma:g}: the gaussian kernel exceeds 1 at d = 0 when sigma < "
            f"{loss_registry.MIN_EXPW_GAUSSIAN_SIGMA:.4f}, which turns expw's repulsion into attraction: expected "
            f"sigma >= 0.3990 or another kernel"
        )
    expected_head = "regression" if loss.method in SUPERVISED_LOSS_METHODS else "contrastive"
    if cfg.model.head != expected_head:
        raise ConfigError(
            f"{where}model.head = '{cfg.model.head}': loss.method '{loss.method}' needs model.head "
            f"'{expected_head}' (l1/mse train a regression head, the contrastive losses a projection head)"
        )
    if cfg.model.backbone == "densenet121" and cfg.model.base_width % 2:
        raise ConfigError(
            f"{where}model.base_width = {cfg.model.base_width}: densenet121 needs an even base_width "
            f"(growth rate = base_width / 2)"
        )
    ev = cfg.evaluation
    if ev.val_internal_frac + ev.val_external_frac >= 1.0:
        raise ConfigError(
            f"{where}evaluation.val_internal_frac + evaluation.val_external_frac = "
            f"{ev.val_internal_frac:g} + {ev.val_external_frac:g}: expected a sum < 1 (some subjects must "
            f"remain for training)"
        )
    if cfg.training.train_on == "train_minus_val" and ev.val_internal_frac == 0.0 and ev.val_external_frac == 0.0:
        raise ConfigError(
            f"{where}training.train_on = 'train_minus_val' with evaluation.val_internal_frac = 0 and "
            f"evaluation.val_external_frac = 0: expected at least one validation fraction > 0 "
            f"(or training.train_on: train)"
        )
    data = cfg.data
    if data.synthetic is not None and data.source is not None:
        raise ConfigError(
            f"{where}data.source = '{data.source}' and data.synthetic are both set: expected one of them "
            f"(the synthetic cohort is generated into the cache)"
        )
    if data.mask is not None and data.layout != "ramp":
        raise ConfigError(
            f"{where}data.mask = '{data.mask}': a mask is used only with data.layout 'ramp' "
            f"(found '{data.layout}'): expected null"
        )


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def config_from_dict(
    d: Mapping[str, Any] | None,
    source: str = "<dict>",
    *,
    expand_env: bool = True,
    ignore_sections: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> ExperimentConfig:
    """Validate a plain nested dict into an :class:`ExperimentConfig` (missing keys take defaults).

    ``ignore_sections``: top-level keys to drop before validation (e.g. ``("search", "study")`` for a
    search-space YAML). ``source`` names the file (or origin) in error messages.
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{_where(source)}expected a mapping of sections at the top level, found {type(d).__name__}")
    ignored = set(ignore_sections)
    d = {k: v for k, v in d.items() if k not in ignored}
    if expand_env:
        d = expand_env_vars(d, source=source, environ=environ)
    d = _defaults_for_method(d)
    cfg = _build(ExperimentConfig, d, "", source)
    _check_cross_fields(cfg, source)
    return cfg


def parse_override(override: str, *, source: str | None = None) -> tuple[str, Any]:
    """``"a.b=c"`` -> (``"a.b"``, value converted to the field's type). ConfigError on bad syntax/key/value."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"{_where(source)}override {override!r}: expected 'dotted.key=value', e.g. 'loss.sigma=2'")
    key, _, text = override.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(
            f"{_where(source)}override {override!r}: the key '{key}' is not a dotted path: expected "
            f"'dotted.key=value', e.g. 'loss.sigma=2'"
        )
    info = field_info(key, source=f"{_where(source)}override {override!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_where(source)}override {override!r}: the value is not valid YAML ({exc})") from None
    if info.type is str and value is not None and not isinstance(value, str):
        value = text.strip()  # e.g. data.store=2024 is the folder "2024", not an int
    return key, value


def apply_overrides(d: Mapping[str, Any] | None, overrides: Iterable[str], *, source: str | None = None) -> dict:
    """A copy of ``d`` with each ``"a.b=c"`` override set (intermediate sections created as needed).

    Keys are checked against the schema (unknown key -> ConfigError with the closest valid key); the
    value is parsed as a YAML scalar and checked against the field's type and range.
    """
    out: dict[str, Any] = plain_copy(d or {})
    for override in overrides:
        key, value = parse_override(override, source=source)
        # Validate the value now so that the error names the override, not a later config line.
        checked = check_value(key, value, source=f"{_where(source)}override {override!r}")
        if not dataclasses.is_dataclass(checked):
            value = checked
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def plain_copy(d: Any) -> Any:
    """Deep copy of a YAML-like tree, every mapping turned into a plain ``dict`` (lists copied too)."""
    if isinstance(d, Mapping):
        return {k: plain_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [plain_copy(v) for v in d]
    return d


def config_differences(a: Any, b: Any, *, close_floats: bool = False) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every leaf where two nested mappings differ, sorted by
    key; a key missing on one side has None there. ``close_floats``: two floats equal within
    ``math.isclose`` count as equal. Used to name what changed between a saved and a current config."""
    out: list[tuple[str, Any, Any]] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else str(key))
        elif x != y and not (close_floats and isinstance(x, float) and isinstance(y, float) and math.isclose(x, y)):
            out.append((path, x, y))

    walk(a, b, "")
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; ConfigError naming the file when unreadable or not a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(d).__name__}")
    return d


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    *,
    expand_env: bool = True,
    ignore_sections: Iterable[str] = (),
) -> ExperimentConfig:
    """Load, override and validate an experiment YAML. Errors name ``path`` and the key at fault."""
    source = str(path)
    d = load_yaml(path)
    d = apply_overrides(d, overrides, source=source)
    return config_from_dict(d, source, expand_env=expand_env, ignore_sections=ignore_sections)
