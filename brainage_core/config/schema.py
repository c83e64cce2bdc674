"""The experiment config's key tree: its sections, keys, types, ranges and defaults.

The schema is the one pinned in ``docs/interfaces.md`` ("The experiment YAML"); the defaults are the
paper's recipe (ResNet-18, y-aware loss with an RBF kernel, Adam lr 1e-4, step decay x0.9 every 10
epochs, batch 32, 2 views, 300 epochs). Each field states its constraints with
:func:`~brainage_core.config.validate.setting`; the engine in ``validate.py`` checks them, and the rules
that tie several keys together are in ``rules.py``.

``field_type(key)`` / ``field_info(key)`` / ``check_value(key, value)`` let a search space refer to
dotted keys such as ``loss.temperature`` and have them checked against this schema.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from brainage_core import loss_registry
from brainage_core.config.validate import FieldInfo, check, lookup, section, setting

# (the public names are listed once, in brainage_core/config/__init__.py)

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


@dataclass
class SyntheticConfig:
    """A synthetic cohort to generate (``brainage_core.data.synthetic.generate_cohort``)."""

    subjects: int | None = setting(300, ge=2)  # None with full=True means the real split sizes
    sites: int | None = setting(None, ge=2)  # None: the 64 OpenBHB sites
    strength: float = setting(1.5, ge=0.0)
    age_confound: float = setting(1.0, ge=0.0, le=1.0)
    seed: int = setting(0, ge=0)


@dataclass
class DataConfig:
    """Where the subjects come from and the prepared store they are read from."""

    store: str | None = setting(None)
    source: str | None = setting(None)
    layout: str = setting("openbhb", choices=("openbhb", "ramp", "nifti"))
    modality: str = setting("vbm", choices=("vbm", "quasiraw"))
    grid: str = setting("full", choices=GRIDS)
    mask: str | None = setting(None)
    resample: bool = setting(False)
    on_error: str = setting("raise", choices=("raise", "skip"))
    synthetic: SyntheticConfig | None = setting(None)


@dataclass
class ModelConfig:
    """Backbone and head (``brainage_core.models.build_model``).

    ``feature`` chooses what a contrastive model hands to the probes; a regression model always hands
    its encoder output (``feature`` defaults to ``encoder`` for it).
    """

    backbone: str = setting("resnet18", choices=BACKBONES)
    head: str = setting("contrastive", choices=HEADS)
    base_width: int = setting(64, ge=1)
    feature: str = setting("projection", choices=("projection", "encoder"))
    sync_batchnorm: bool = setting(False)
    channels_last: bool = setting(False)
    compile: bool = setting(False)


@dataclass
class LossConfig:
    """The loss (``brainage_core.losses.build_loss``); see ``docs/losses.md``.

    ``kernel`` defaults to ``rbf`` for the methods that need one (yaware, threshold, expw) and to
    None for the others; ``form`` None means the method's default (``reference``);
    ``temperature`` None means the method's default (0.1, or 2.0 for rnc).
    """

    method: str = setting("yaware", choices=LOSS_METHODS)
    kernel: str | None = setting("rbf", choices=KERNELS)
    sigma: float = setting(loss_registry.DEFAULT_SIGMA, gt=0.0)
    temperature: float | None = setting(0.1, gt=0.0)
    base_temperature: float = setting(0.07, gt=0.0)
    form: str | None = setting(None, choices=loss_registry.FORMS)
    delta_reduction: str = setting("sum", choices=loss_registry.DELTA_REDUCTIONS)
    threshold_margin: float = setting(0.0, ge=0.0)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_loss(method, **kwargs)`` holding only what the method takes
        (``brainage_core.loss_registry.LossMethod.parameters``)."""
        return {name: getattr(self, name) for name in loss_registry.method_info(self.method).parameters}


@dataclass
class OptimizerConfig:
    name: str = setting("adam", choices=("adam", "sgd"))
    lr: float = setting(1.0e-4, gt=0.0)
    weight_decay: float = setting(5.0e-5, ge=0.0)
    momentum: float = setting(0.9, ge=0.0, lt=1.0)  # SGD only


@dataclass
class ScheduleConfig:
    """``step``: lr x rate every ``step_every`` epochs; ``cosine``: down to lr*rate^3; ``none``."""

    name: str = setting("step", choices=("step", "cosine", "none"))
    step_every: int = setting(10, ge=1)
    rate: float = setting(0.9, gt=0.0, le=1.0)
    warmup_epochs: int = setting(0, ge=0)


@dataclass
class AugmentConfig:
    crop: bool = setting(False)
    cutout: bool = setting(False)
    zscore: bool = setting(False)


@dataclass
class TrainingConfig:
    epochs: int = setting(300, ge=1)
    batch_size: int = setting(32, ge=1)
    views: int = setting(2, ge=1)
    bf16: bool = setting(False)
    grad_clip: float | None = setting(None, gt=0.0)
    seed: int = setting(0, ge=0)
    loader_workers: int = setting(2, ge=0)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    train_on: str = setting("train_minus_val", choices=("train_minus_val", "train", "all"))
    augment: AugmentConfig = section(AugmentConfig)


@dataclass
class EvaluationConfig:
    eval_every: int = setting(10, ge=1)
    val_internal_frac: float = setting(0.09, ge=0.0, lt=1.0)
    val_external_frac: float = setting(0.10, ge=0.0, lt=1.0)
    val_seed: int = setting(0, ge=0)
    batch_size: int = setting(32, ge=1)
    test: bool = setting(True)
    # Probe protocol (docs/probes.md): "fast" for the evaluations during training (selection, ASHA),
    # final_protocol for the last evaluation of a run, study/final.py and the probes of study/export.py.
    protocol: str = setting("fast", choices=PROBE_PROTOCOLS)
    final_protocol: str = setting("exact", choices=PROBE_PROTOCOLS)


@dataclass
class ExperimentConfig:
    """One experiment: every section of the YAML schema, validated."""

    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    loss: LossConfig = section(LossConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    training: TrainingConfig = section(TrainingConfig)
    evaluation: EvaluationConfig = section(EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML/JSON-safe) that ``config_from_dict`` turns back into this config."""
        return dataclasses.asdict(self)


def field_info(dotted_key: str, *, source: str | None = None) -> FieldInfo:
    """The schema entry for ``dotted_key`` (e.g. ``loss.temperature``, ``data.synthetic.subjects``).

    Raises ConfigError naming the first unknown component and the closest valid key.
    """
    return lookup(ExperimentConfig, dotted_key, source=source)


def field_type(dotted_key: str) -> type:
    """The base type of a dotted key (int, float, bool, str, or a section dataclass); ConfigError if unknown."""
    return field_info(dotted_key).type


def check_value(dotted_key: str, value: Any, *, source: str | None = None) -> Any:
    """Validate one value for ``dotted_key`` and return it converted (e.g. int 2 -> 2.0 for a float key).

    Section keys accept a mapping (validated) or null where the section is optional.
    """
    return check(field_info(dotted_key, source=source), value, dotted_key, source)
