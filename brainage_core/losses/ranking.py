"""Shared O(N² log N) machinery of the losses whose denominators depend on an age ranking
(``threshold`` form ``paper`` and ``rnc``).

For anchor a and every k they need a sum over the embeddings j ≠ a farther in age from a than k is::

    T_ak = Σ_{j≠a, |y_a − y_j| > |y_a − y_k| + δ} exp(s_aj)     (strict: threshold)
    T_ak = Σ_{j≠a, |y_a − y_j| ≥ |y_a − y_k|}     exp(s_aj)     (inclusive: rnc, ties included)

Never an N×N×N tensor: each anchor's row is ordered by age distance (ages only, no gradient), a
cumulative sum along that order from the farthest sample inwards (the reversed cumulative sum of the
ascending order) gives every tail sum at once, and a binary search finds each k's cut-off (with
δ = 0 the cut-offs are the tie-group bounds of the sorted rows, found without the search). Ages are
tiled over the V views, so the sort and the binary searches run on the B×B subject matrix and are
expanded to N columns (the V views of a subject are adjacent in the order).

The tail sums are taken in float64 after subtracting each row's maximum (a constant): exact to
rounding as long as a row spans less than ``LINEAR_RANGE_LIMIT`` in s (τ ≥ 0.002 for unit vectors).
Wider rows fall back to a cumulative logsumexp along the same order, which is slower but has no range limit.
"""

from __future__ import annotations

import torch

LINEAR_RANGE_LIMIT = 600.0  # exp(-600) ≈ 1e-261: far inside float64, so no tail underflows to 0


def _ranked_columns(
    subject_ages: torch.Tensor, anchor_subjects: torch.Tensor, views: int, margin: float, inclusive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N) columns ordered from the farthest in age to the nearest, and (n, N) tail lengths.

    The tail length of k is the number of embeddings with |y_a − y_j| > |y_a − y_k| + margin
    (≥ |y_a − y_k| when ``inclusive``): they are the first ones of the order.
    """
    subjects = subject_ages.shape[0]
    with torch.no_grad():
        distances = (subject_ages.unsqueeze(1) - subject_ages.unsqueeze(0)).abs()  # (B, B)
        ascending, order = torch.sort(distances, dim=1)
        if margin == 0:
            nearer = _tie_group_bounds(ascending, order, after=not inclusive)
        else:
            nearer = torch.searchsorted(ascending, (distances + margin).contiguous(), right=True)
        view_offsets = torch.arange(views, device=order.device) * subjects
        columns = (order.flip(1).unsqueeze(-1) + view_offsets).reshape(subjects, subjects * views)
        # column k of the N stacked embeddings is subject k mod B: tile the subject tail lengths
        lengths = ((subjects - nearer) * views).repeat(1, views)
    return columns[anchor_subjects], lengths[anchor_subjects]


def _tie_group_bounds(ascending: torch.Tensor, order: torch.Tensor, *, after: bool) -> torch.Tensor:
    """For each entry (original column order) the number of entries of its row ≤ it (``after``) or < it.

    The same as a binary search of every entry in its own sorted row (``searchsorted`` right/left),
    found from the tie groups of the sorted rows in O(B²) instead.
    """
    width = ascending.shape[1]
    positions = torch.arange(width, device=ascending.device).expand_as(ascending)
    changes = ascending[:, 1:] != ascending[:, :-1]
    edge = torch.ones((ascending.shape[0], 1), dtype=torch.bool, device=ascending.device)
    if after:  # one past the last position of the entry's tie group
        is_last = torch.cat([changes, edge], dim=1)
        ends = torch.where(is_last, positions + 1, width)
        bounds = torch.flip(torch.cummin(torch.flip(ends, dims=(1,)), dim=1).values, dims=(1,))
    else:  # the first position of the entry's tie group
        is_first = torch.cat([edge, changes], dim=1)
        bounds = torch.cummax(torch.where(is_first, positions, 0), dim=1).values
    return torch.empty_like(bounds).scatter_(1, order, bounds)


def ranked_log_denominators(
    similarities: torch.Tensor,
    self_mask: torch.Tensor,
    subject_ages: torch.Tensor,
    anchor_subjects: torch.Tensor,
    views: int,
    *,
    margin: float = 0.0,
    inclusive: bool = False,
    add_positive: bool = False,
) -> torch.Tensor:
    """(n, N) log(T_ak), or log(exp(s_ak) + T_ak) with ``add_positive``; 0 on each anchor's own column.

    ``similarities`` (n, N) s_ab of the anchors against all embeddings, ``self_mask`` (n, N) True at
    each anchor's own column, ``subject_ages`` (B,), ``anchor_subjects`` (n,) = anchor index mod B.
    Every T_ak used must be non-empty unless ``add_positive`` (callers guarantee it: rnc includes k).
    """
    columns, lengths = _ranked_columns(subject_ages, anchor_subjects, views, margin, inclusive)
    row_max = similarities.detach().max(dim=1, keepdim=True).values
    row_min = similarities.detach().masked_fill(self_mask, float("inf")).min(dim=1, keepdim=True).values
    if bool(((row_max - row_min) < LINEAR_RANGE_LIMIT).all()):
        shifted = (similarities - row_max).to(torch.float64)
        terms = torch.exp(shifted).masked_fill(self_mask, 0.0)
        prefix = torch.cumsum(torch.gather(terms, 1, columns), dim=1)
        prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix], dim=1)  # prefix[:, L] = sum of the first L
        denominators = torch.gather(prefix, 1, lengths)
        if add_positive:
            denominators = denominators + terms
        denominators = denominators.masked_fill(self_mask, 1.0)
        return (torch.log(denominators) + row_max.to(torch.float64)).to(similarities.dtype).masked_fill(self_mask, 0.0)

    # Wide rows: the same sums in log space. The anchor's own column gets a value far below every
    # other one (a constant), so it adds nothing and no −inf enters the cumulative logsumexp.
    floor = row_min - 1e4
    masked = torch.where(self_mask, floor.expand_as(similarities), similarities)
    prefix = torch.logcumsumexp(torch.gather(masked, 1, columns), dim=1)
    prefix = torch.cat([torch.full_like(prefix[:, :1], float("-inf")), prefix], dim=1)
    log_denominators = torch.gather(prefix, 1, lengths)
    if add_positive:
        log_denominators = torch.logaddexp(similarities, log_denominators)
    return log_denominators.masked_fill(self_mask, 0.0)
