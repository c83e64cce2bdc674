"""Shared O(N² log N) machinery of the losses whose denominators depend on an age ranking.

For each anchor a the other embeddings are sorted by age distance |y_a − y_j| (ages only, no
gradient); a reversed cumulative logsumexp of s_aj along that order gives, at position p, the log of
Σ exp(s_aj) over the embeddings at positions ≥ p; a binary search finds each k's cut-off. No N×N×N
tensor is ever built.
"""

from __future__ import annotations

import torch


class AgeRanking:
    """Rows of age distances (n, M), sorted once, against which cut-offs are searched."""

    def __init__(self, distances: torch.Tensor) -> None:
        self.distances = distances.detach()
        self.sorted_distances, self.order = torch.sort(self.distances, dim=1)

    def tail_logsumexp(self, similarities: torch.Tensor) -> torch.Tensor:
        """(n, M + 1): column p = log Σ exp(s_aj) over the sorted positions ≥ p; column M = −inf."""
        ranked = torch.gather(similarities, 1, self.order)
        tails = torch.flip(torch.logcumsumexp(torch.flip(ranked, dims=(1,)), dim=1), dims=(1,))
        empty = torch.full_like(tails[:, :1], float("-inf"))
        return torch.cat([tails, empty], dim=1)

    def first_position_above(self, thresholds: torch.Tensor) -> torch.Tensor:
        """(n, M) index of the first sorted distance > threshold (M when there is none)."""
        return torch.searchsorted(self.sorted_distances, thresholds.detach().contiguous(), right=True)

    def first_position_at_least(self, thresholds: torch.Tensor) -> torch.Tensor:
        """(n, M) index of the first sorted distance ≥ threshold (M when there is none)."""
        return torch.searchsorted(self.sorted_distances, thresholds.detach().contiguous(), right=False)
