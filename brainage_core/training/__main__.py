"""``python -m brainage_core.training CONFIG.yaml [a.b=c ...] --out DIR [--resume]``: train one configuration.

Plain entry point without Ray, for debugging and single runs: writes ``DIR/metrics.jsonl`` (one JSON
object per evaluation), ``DIR/train_log.jsonl`` (one per epoch), ``DIR/config.yaml`` (the resolved
config) and ``DIR/checkpoint/``, and logs one line per epoch. ``--resume`` continues from
``DIR/checkpoint/`` when there is one. Under ``torchrun --nproc-per-node N`` the process group is
created from torchrun's environment and the run is DistributedDataParallel over N ranks.
Exit status: 0 done, 2 bad input (config, data, checkpoint), 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from brainage_core.errors import BrainageError, NonFiniteLossError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m brainage_core.training", description=__doc__.splitlines()[0],
        allow_abbrev=False)
    parser.add_argument("config", type=Path, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.sigma=2 training.epochs=5")
    parser.add_argument("--out", type=Path, required=True, help="output folder (metrics.jsonl, checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/ when it exists")
    parser.add_argument("--device", default=None, help="override training.device (auto, cpu, cuda, cuda:1)")
    parser.add_argument("--keep-checkpoints", type=int, default=1, metavar="N",
                        help="keep the N latest checkpoint folders (default 1)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    log = logging.getLogger("brainage_core.training")
    try:
        import torch.distributed as dist

        from brainage_core.config import load_config
        from brainage_core.training.checkpoint import CHECKPOINT_FILE, LATEST_DIR, find_checkpoint
        from brainage_core.training.distributed import init_process_group_from_env
        from brainage_core.training.loop import resolve_device, train

        cfg = load_config(args.config, args.overrides)
        device = resolve_device(args.device or cfg.training.device, world_size=_env_world_size())
        rank, world_size = init_process_group_from_env(device)
        device = resolve_device(args.device or cfg.training.device, world_size=world_size)
        resume_from = None
        if args.resume:
            try:
                resume_from = find_checkpoint(args.out)
            except BrainageError:
                log.info("--resume: no %s/%s/%s yet, starting from epoch 1", args.out, LATEST_DIR, CHECKPOINT_FILE)
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        try:
            metrics = train(
                cfg, args.out, rank=rank, world_size=world_size, device=device, resume_from=resume_from,
                keep_checkpoints=args.keep_checkpoints,
            )
        finally:
            if world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        keys = ("epoch", "val_mae_int", "val_mae_ext", "val_bacc", "val_lc")
        shown = {k: metrics[k] for k in keys if k in metrics}
        log.info("done: %s -> %s", shown, args.out)
    return 0


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    sys.exit(main())
