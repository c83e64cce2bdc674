"""Distributed equivalence of the contrastive losses (docs/losses.md, "Under
DDP"): two gloo processes on CPU, each with half of the batch under DDP and gather_distributed
left at None (on, since the process group is initialised with world size 2), give the parameter
gradients of one process on the concatenated batch, and the mean of their losses equals its loss."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_helpers import exit_gloo_worker
from torch import nn

from brainage_core.losses import build_loss

torch.set_num_threads(1)

WORLD_SIZE = 2
LOCAL_BATCH = 4
TOLERANCE = 1e-6

# (case name, views, build_loss options)
CASES = [
    ("yaware", 2, {"method": "yaware", "kernel": "rbf", "sigma": 2.0}),
    ("threshold_reference", 2, {"method": "threshold", "kernel": "rbf", "sigma": 2.0}),
    ("threshold_paper", 2, {"method": "threshold", "kernel": "cauchy", "form": "paper", "threshold_margin": 0.5}),
    ("expw_reference", 2, {"method": "expw", "kernel": "rbf", "sigma": 2.0}),
    ("expw_paper", 3, {"method": "expw", "kernel": "gaussian", "sigma": 0.5, "form": "paper"}),
    ("rnc", 2, {"method": "rnc"}),
    # V = 1 with a narrow kernel: the ranks hold different numbers of anchors with positives
    ("yaware_exclusions", 1, {"method": "yaware", "kernel": "rbf", "sigma": 0.01}),
]


class TinyEncoder(nn.Module):
    """A linear projection of every view, L2-normalised (unnormalised for rnc)."""

    def __init__(self, normalise: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4, dtype=torch.float64)
        self.normalise = normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, V, 6) -> (B, V, 4)
        z = self.linear(x)
        return F.normalize(z, dim=-1) if self.normalise else z


def make_data():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, 6, generator=generator, dtype=torch.float64)
    ages = torch.tensor([20.0, 21.0, 21.0, 35.0, 22.0, 50.0, 20.0, 35.0], dtype=torch.float64)
    torch.manual_seed(1)
    state = TinyEncoder().state_dict()
    return inputs, ages, state


def run_case(encoder: nn.Module, module: nn.Module, inputs, ages, views, options):
    loss_fn = build_loss(**options)
    loss = loss_fn(module(inputs[:, :views]), ages)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in encoder.parameters()]


def ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs, ages, state = make_data()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for name, views, options in CASES:
            encoder = TinyEncoder(normalise=options["method"] != "rnc")
            encoder.load_state_dict(state)
            ddp = nn.parallel.DistributedDataParallel(encoder)
            results[name] = run_case(encoder, ddp, inputs[local], ages[local], views, options)
        torch.save(results, f"{out_file}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_gloo_worker()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "result")), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(WORLD_SIZE)]

    inputs, ages, state = make_data()
    for name, views, options in CASES:
        encoder = TinyEncoder(normalise=options["method"] != "rnc")
        encoder.load_state_dict(state)
        single_loss, single_grads = run_case(encoder, encoder, inputs, ages, views, options)
        rank_losses = [ranks[r][name][0] for r in range(WORLD_SIZE)]
        assert abs(sum(rank_losses) / WORLD_SIZE - single_loss) <= TOLERANCE, (name, rank_losses, single_loss)
        for r in range(WORLD_SIZE):
            for got, expected in zip(ranks[r][name][1], single_grads):
                assert torch.allclose(got, expected, rtol=0, atol=TOLERANCE), (name, r, (got - expected).abs().max())
        # the per-rank losses are not all the same: each rank really computes its own anchors
        assert abs(rank_losses[0] - rank_losses[1]) > 1e-6, name
