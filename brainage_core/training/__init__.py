"""The training loop and its checkpoints (framework-agnostic: reports through a callback, never imports Ray).

``train(config, out_dir, *, callback=None, rank=0, world_size=1, device=None, resume_from=None)`` runs
the epoch loop (:mod:`.loop`); ``load_checkpoint(dir)`` reads a checkpoint folder with
``weights_only=True`` (:mod:`.checkpoint`); ``load_model_from_checkpoint(dir) -> (model, config_dict)``
rebuilds the trained model in eval mode on the CPU. Command line: ``python -m brainage_core.training``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from brainage_core.training.checkpoint import CheckpointError, load_checkpoint
from brainage_core.training.loop import train

__all__ = ["CheckpointError", "load_checkpoint", "load_model_from_checkpoint", "train"]


def load_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model stored in a checkpoint (folder or output folder) and its config as a plain dict.

    The model is rebuilt from the stored config (``brainage_core.config.config_from_dict``), its weights
    loaded strictly, and returned on the CPU in eval mode.
    """
    from brainage_core.config import config_from_dict
    from brainage_core.training.loop import build_training_model

    state = load_checkpoint(path)
    config = dict(state["config"])
    model = build_training_model(config_from_dict(config, source=f"{state['path']} (config)", expand_env=False))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {state['path']}: weights do not fit the model of its config: {exc}") from exc
    model.eval()
    return model, config
