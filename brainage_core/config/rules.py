"""The rules of the experiment config that tie several keys together.

Two kinds: method-dependent defaults, applied to the raw dict before validation and only to keys the
user left out (:func:`method_defaults`), and cross-field checks on the validated config
(:func:`check_cross_fields`). What each loss method takes (a kernel, a form, a margin, its default
temperature, its head) is read from ``brainage_core/loss_registry.py``, the one list of loss methods;
nothing here repeats it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brainage_core import loss_registry
from brainage_core.config.schema import KERNEL_METHODS, KERNELS, ExperimentConfig
from brainage_core.config.validate import where as where_of
from brainage_core.errors import ConfigError

__all__ = ["check_cross_fields", "method_defaults"]


def method_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """Method-dependent defaults, applied only to keys the user left out (a copy of ``d``).

    ``loss.kernel`` defaults to null for methods that take no kernel, ``loss.temperature`` to the
    method's default (2.0 for rnc, losses.md); ``model.head`` to the head the method trains (regression
    for l1/mse) and ``model.feature`` to ``encoder`` for a regression head. Explicit contradictory
    values stay and fail the cross-field checks with a clear message.
    """
    d = dict(d)
    loss = d.get("loss")
    method = loss.get("method") if isinstance(loss, Mapping) else None
    if method is None or not isinstance(method, str):
        return d
    loss = dict(loss)
    info = loss_registry.METHODS.get(method)
    if "kernel" not in loss and (info is None or not info.kernel):
        loss["kernel"] = None
    if "temperature" not in loss and info is not None and info.default_temperature is not None:
        loss["temperature"] = info.default_temperature  # 2.0 for rnc, the field's 0.1 for the others
    d["loss"] = loss
    raw_model = d.get("model", {})
    if not isinstance(raw_model, Mapping):  # left for the type check to report
        return d
    model = dict(raw_model)
    if "head" not in model and info is not None and info.kind == "supervised":
        model["head"] = "regression"
    if "feature" not in model and model.get("head") == "regression":
        model["feature"] = "encoder"
    if model or "model" in d:
        d["model"] = model
    return d


def check_cross_fields(cfg: ExperimentConfig, source: str | None) -> None:
    """ConfigError (one line naming ``source`` and the keys) for the first rule ``cfg`` breaks."""
    where = where_of(source)
    _check_loss(cfg, where)
    _check_model(cfg, where)
    _check_evaluation(cfg, where)
    _check_data(cfg, where)


def _check_loss(cfg: ExperimentConfig, where: str) -> None:
    loss = cfg.loss
    info = loss_registry.method_info(loss.method)
    if info.kernel and loss.kernel is None:
        raise ConfigError(f"{where}loss.kernel = null: loss.method '{loss.method}' needs a kernel: expected one of "
                          f"{', '.join(KERNELS)}")
    if not info.kernel and loss.kernel is not None:
        raise ConfigError(f"{where}loss.kernel = '{loss.kernel}': loss.method '{loss.method}' takes no kernel "
                          f"(only {', '.join(KERNEL_METHODS)} do): expected null")
    if loss.form is not None and not info.forms:
        form_methods = " or ".join(loss_registry.FORM_METHODS)
        raise ConfigError(f"{where}loss.form = '{loss.form}': only loss.method {form_methods} has a form, "
                          f"not '{loss.method}': expected null")
    if loss.threshold_margin != 0.0 and not loss_registry.margin_applies(loss.method, loss.form):
        takers = " or ".join(f"'{m.name}' with loss.form '{m.margin_form}'"
                             for m in loss_registry.METHODS.values() if m.margin_form is not None)
        raise ConfigError(f"{where}loss.threshold_margin = {loss.threshold_margin:g}: a margin applies only to "
                          f"loss.method {takers} (found method '{loss.method}', form {loss.form!r}): expected 0")
    if loss.method == "expw" and loss.kernel == "gaussian" and loss.sigma < loss_registry.MIN_EXPW_GAUSSIAN_SIGMA:
        raise ConfigError(f"{where}loss.sigma = {loss.sigma:g}: the gaussian kernel exceeds 1 at d = 0 when sigma < "
                          f"{loss_registry.MIN_EXPW_GAUSSIAN_SIGMA:.4f}, which turns expw's repulsion into "
                          f"attraction: expected sigma >= 0.3990 or another kernel")


def _check_model(cfg: ExperimentConfig, where: str) -> None:
    method = cfg.loss.method
    expected_head = "regression" if loss_registry.method_info(method).kind == "supervised" else "contrastive"
    if cfg.model.head != expected_head:
        supervised = "/".join(loss_registry.SUPERVISED_METHODS)
        raise ConfigError(f"{where}model.head = '{cfg.model.head}': loss.method '{method}' needs model.head "
                          f"'{expected_head}' ({supervised} train a regression head, the contrastive losses a "
                          f"projection head)")
    if cfg.model.backbone == "densenet121" and cfg.model.base_width % 2:
        raise ConfigError(f"{where}model.base_width = {cfg.model.base_width}: densenet121 needs an even base_width "
                          f"(growth rate = base_width / 2)")


def _check_evaluation(cfg: ExperimentConfig, where: str) -> None:
    ev = cfg.evaluation
    if ev.val_internal_frac + ev.val_external_frac >= 1.0:
        raise ConfigError(f"{where}evaluation.val_internal_frac + evaluation.val_external_frac = "
                          f"{ev.val_internal_frac:g} + {ev.val_external_frac:g}: expected a sum < 1 (some subjects "
                          f"must remain for training)")
    if cfg.training.train_on == "train_minus_val" and ev.val_internal_frac == 0.0 and ev.val_external_frac == 0.0:
        raise ConfigError(f"{where}training.train_on = 'train_minus_val' with evaluation.val_internal_frac = 0 and "
                          f"evaluation.val_external_frac = 0: expected at least one validation fraction > 0 "
                          f"(or training.train_on: train)")


def _check_data(cfg: ExperimentConfig, where: str) -> None:
    data = cfg.data
    if data.synthetic is not None and data.source is not None:
        raise ConfigError(f"{where}data.source = '{data.source}' and data.synthetic are both set: expected one of "
                          f"them (the synthetic cohort is generated into the cache)")
    if data.mask is not None and data.layout != "ramp":
        raise ConfigError(f"{where}data.mask = '{data.mask}': a mask is used only with data.layout 'ramp' "
                          f"(found '{data.layout}'): expected null")
