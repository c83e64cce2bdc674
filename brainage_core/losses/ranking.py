"""Shared O(N² log N) machinery of the losses whose denominators depend on an age ranking
(``threshold`` form ``paper`` and ``rnc``).

For anchor a and every k they need a sum over the embeddings j ≠ a farther in age from a than k is::

    T_ak = Σ_{j≠a, |y_a − y_j| > |y_a − y_k| + δ} exp(s_aj)     (strict: threshold)
    T_ak = Σ_{j≠a, |y_a − y_j| ≥ |y_a − y_k|}     exp(s_aj)     (inclusive: rnc, ties included)

Never an N×N×N tensor: each anchor's row is ordered by age distance (ages only, no gradient), a
cumulative sum along that order from the farthest sample inwards (the reversed cumulative sum of the
ascending order) gives every tail sum at once, and a binary search finds each k's cut-off (with
δ = 0 the cut-offs are the tie-group bounds of the sorted rows, found without the search). Ages are
tiled over the V views, so the sort and the searches run on the B×B subject matrix and are expanded
to N columns (the V views of a subject are adjacent in the order). Each anchor's own column is put
last in its row, so a tail never reaches it except the whole row (inclusive, cut at distance 0),
which is cut one short.

The tail sums are taken in the linear domain after subtracting each row's maximum (a constant), in
float32 when every row spans less than 75 in s (exp(−75) is a normal float32: τ ≥ 0.027 for unit
vectors), else in float64 up to a span of 600; wider rows fall back to a cumulative logsumexp along
the same order, slower but with no range limit.
"""

from __future__ import annotations

import torch

# largest row span (max − min of s) for which exp(s − max) cannot underflow to 0 or lose precision
LINEAR_RANGE_LIMITS: dict[torch.dtype, float] = {torch.float32: 75.0, torch.float64: 600.0}


def _subject_ranking(
    subject_ages: torch.Tensor, margin: float, inclusive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) subjects ordered from the farthest in age to the nearest (each row's own subject last)
    and (B, B) the number of subjects in the tail of each subject k: |y_i − y_l| > |y_i − y_k| + margin
    (≥ |y_i − y_k| when ``inclusive``)."""
    subjects = subject_ages.shape[0]
    distances = (subject_ages.unsqueeze(1) - subject_ages.unsqueeze(0)).abs()  # (B, B)
    # sorting key: the own subject first among the zero distances (hence last once reversed)
    key = distances.clone()
    key.diagonal().fill_(-1.0)
    order = torch.sort(key, dim=1, stable=True).indices
    ascending = torch.gather(distances, 1, order)
    if margin == 0:
        nearer = tie_group_bounds(ascending, order, after=not inclusive)
    else:
        nearer = torch.searchsorted(ascending, (distances + margin).contiguous(), right=not inclusive)
    return order.flip(1), subjects - nearer


def tie_group_bounds(ascending: torch.Tensor, order: torch.Tensor, *, after: bool) -> torch.Tensor:
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


def _ranked_columns(
    subject_ages: torch.Tensor, anchors: torch.Tensor, views: int, margin: float, inclusive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N) each anchor's columns from the farthest in age to the nearest, its own column last,
    and (n, N) the tail length of each column k (how many of the first columns form T_ak)."""
    subjects = subject_ages.shape[0]
    size = subjects * views
    with torch.no_grad():
        order, tail_subjects = _subject_ranking(subject_ages, margin, inclusive)
        anchor_subjects, anchor_views = anchors % subjects, anchors // subjects
        # within every subject block, the anchor's own view comes last
        view_order = (torch.arange(views, device=anchors.device) + anchor_views.unsqueeze(1) + 1) % views
        columns = order[anchor_subjects].unsqueeze(2) + (view_order * subjects).unsqueeze(1)
        # column k of the N stacked embeddings is subject k mod B: tile the subject tail lengths
        lengths = (tail_subjects[anchor_subjects] * views).clamp_max(size - 1).repeat(1, views)
    return columns.reshape(anchors.shape[0], size), lengths


def ranked_log_denominators(
    similarities: torch.Tensor,
    subject_ages: torch.Tensor,
    anchors: torch.Tensor,
    views: int,
    *,
    margin: float = 0.0,
    inclusive: bool = False,
    add_positive: bool = False,
) -> torch.Tensor:
    """(n, N) log T_ak, or log(exp(s_ak) + T_ak) with ``add_positive``.

    ``similarities`` (n, N) s_ab of the anchors against all N embeddings, ``subject_ages`` (B,),
    ``anchors`` (n,) the anchors' indices in the view-major stacking. Every T_ak used must be
    non-empty unless ``add_positive`` (rnc's always holds k itself). The value on an anchor's own
    column is finite but meaningless: callers give it weight 0.
    """
    columns, lengths = _ranked_columns(subject_ages, anchors, views, margin, inclusive)
    detached = similarities.detach()
    row_max = detached.amax(dim=1, keepdim=True)
    row_min = detached.amin(dim=1, keepdim=True)
    span = float((row_max - row_min).max())
    work_dtype = None
    for dtype in (similarities.dtype, torch.float64):
        if span < LINEAR_RANGE_LIMITS.get(dtype, 0.0):
            work_dtype = dtype
            break

    if work_dtype is not None:
        terms = torch.exp(similarities.to(work_dtype) - row_max.to(work_dtype))
        prefix = torch.cumsum(torch.gather(terms, 1, columns), dim=1)
        prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix], dim=1)  # prefix[:, L] = sum of the first L
        denominators = torch.gather(prefix, 1, lengths)
        if add_positive:
            denominators = denominators + terms
        return (torch.log(denominators) + row_max.to(work_dtype)).to(similarities.dtype)

    prefix = torch.logcumsumexp(torch.gather(similarities, 1, columns), dim=1)
    prefix = torch.cat([torch.full_like(prefix[:, :1], float("-inf")), prefix], dim=1)
    log_denominators = torch.gather(prefix, 1, lengths)
    if add_positive:
        log_denominators = torch.logaddexp(similarities, log_denominators)
    return log_denominators
