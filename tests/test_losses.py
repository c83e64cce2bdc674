"""brainage_core.losses against slow loops written from docs/losses.md, gradients, stability
under bf16 autocast, and one clear error per bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from brainage_core.errors import LossError
from brainage_core.losses import CONTRASTIVE_METHODS, SUPERVISED_METHODS, build_loss

torch.set_num_threads(1)

TAU0 = 0.07


# ----------------------------------------------------------------------------------------------
# slow references, one Python loop per formula of the spec (float64 Python floats)
# ----------------------------------------------------------------------------------------------


def kernel_value(name: str, sigma: float, d: float) -> float:
    if name == "gaussian":
        return math.exp(-d * d / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    if name == "rbf":
        return math.exp(-d * d / (2 * sigma * sigma))
    if name == "cauchy":
        return 1.0 / (sigma * d * d + 1.0)
    raise AssertionError(name)


def supcon_bin(y: float) -> int:
    for candidate in range(4, 91, 2):
        if candidate >= y:
            return candidate
    return 90


def stacked(features: torch.Tensor, ages: torch.Tensor | None):
    """View-major stacking: embedding a is subject a mod B of view a // B."""
    batch, views, _ = features.shape
    z = [features[a % batch, a // batch].tolist() for a in range(views * batch)]
    y = None if ages is None else [float(ages[a % batch]) for a in range(views * batch)]
    return z, y, batch


def dot(u, v) -> float:
    return sum(p * q for p, q in zip(u, v))


def common_form(z, weight, tau, numerator, log_denominator) -> float:
    """(1/#anchors with positives) Σ_a −(τ/τ₀) Σ_{k≠a} [W_ak/Σ_{t≠a} W_at] (num_ak − log D_ak)."""
    n = len(z)
    total, anchors = 0.0, 0
    for a in range(n):
        weight_sum = sum(weight(a, t) for t in range(n) if t != a)
        if weight_sum == 0:
            continue
        inner = 0.0
        for k in range(n):
            if k != a and weight(a, k) != 0:
                inner += weight(a, k) / weight_sum * (numerator(a, k) - log_denominator(a, k))
        total += -(tau / TAU0) * inner
        anchors += 1
    if anchors == 0:
        raise ValueError("no anchor has positives")
    return total / anchors


def ref_yaware(features, ages, kernel, sigma, tau) -> float:
    z, y, _ = stacked(features, ages)
    n = len(z)

    def s(a, b):
        return dot(z[a], z[b]) / tau

    def w(a, b):
        return kernel_value(kernel, sigma, y[a] - y[b])

    def log_d(a, k):
        return math.log(sum(math.exp(s(a, j)) for j in range(n) if j != a))

    return common_form(z, w, tau, s, log_d)


def ref_supcon(features, ages, tau) -> float:
    z, y, batch = stacked(features, ages)
    n = len(z)

    def s(a, b):
        return dot(z[a], z[b]) / tau

    def w(a, b):
        if y is None:
            return 1.0 if a % batch == b % batch else 0.0
        return 1.0 if supcon_bin(y[a]) == supcon_bin(y[b]) else 0.0

    def log_d(a, k):
        return math.log(sum(math.exp(s(a, j)) for j in range(n) if j != a))

    return common_form(z, w, tau, s, log_d)


def ref_threshold_paper(features, ages, kernel, sigma, tau, margin) -> float:
    z, y, _ = stacked(features, ages)
    n = len(z)

    def s(a, b):
        return dot(z[a], z[b]) / tau

    def w(a, b):
        return kernel_value(kernel, sigma, y[a] - y[b])

    def log_d(a, k):
        value = math.exp(s(a, k))
        for j in range(n):
            if j != a and j != k and abs(y[a] - y[j]) > abs(y[a] - y[k]) + margin:
                value += math.exp(s(a, j))
        return math.log(value)

    return common_form(z, w, tau, s, log_d)


def ref_threshold_reference(features, ages, kernel, sigma, tau, delta_reduction) -> float:
    z, y, _ = stacked(features, ages)
    n = len(z)
    big_w = [[kernel_value(kernel, sigma, y[a] - y[b]) for b in range(n)] for a in range(n)]
    m = [max(dot(z[a], z[b]) / tau for b in range(n)) for a in range(n)]

    def s(a, b):
        return dot(z[a], z[b]) / tau

    def c(a, j):
        count = sum(1 for k in range(n) if big_w[j][k] < big_w[j][a])
        return count / n if delta_reduction == "mean" else count

    def numerator(a, k):
        return s(a, k) - m[a]

    def log_d(a, k):
        value = sum(c(a, j) * math.exp(s(a, j) - m[a]) for j in range(n) if j != a)
        if value == 0:
            raise ZeroDivisionError(a)
        return math.log(value)

    return common_form(z, lambda a, b: big_w[a][b], tau, numerator, log_d)


def ref_expw(features, ages, kernel, sigma, tau, form) -> float:
    z, y, _ = stacked(features, ages)
    n = len(z)

    def w(a, b):
        return kernel_value(kernel, sigma, y[a] - y[b])

    def s(a, b):
        return dot(z[a], z[b]) / tau

    def ell(a, b):
        if form == "paper":
            return s(a, b)
        return s(a, b) - max(s(a, c) for c in range(n))

    def log_d(a, k):
        return math.log(sum(math.exp(ell(a, j) * (1 - w(a, j))) for j in range(n) if j != a))

    return common_form(z, w, tau, ell, log_d)


def ref_rnc(features, ages, tau) -> float:
    z, y, _ = stacked(features, ages)
    n = len(z)

    def s(a, b):
        return -math.sqrt(sum((p - q) ** 2 for p, q in zip(z[a], z[b]))) / tau

    total = 0.0
    for a in range(n):
        for k in range(n):
            if k == a:
                continue
            d_ak = abs(y[a] - y[k])
            denominator = sum(math.exp(s(a, j)) for j in range(n) if j != a and abs(y[a] - y[j]) >= d_ak)
            total += math.log(math.exp(s(a, k)) / denominator)
    return -total / (n * (n - 1))


# ----------------------------------------------------------------------------------------------
# random batches
# ----------------------------------------------------------------------------------------------


def random_batch(seed: int, batch: int, views: int, dim: int = 5, normalise: bool = True):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, views, dim, generator=generator, dtype=torch.float64)
    if normalise:
        features = F.normalize(features, dim=-1)
    # a few distinct ages, so that repeats (ties) are frequent; one half-year age
    ages = torch.randint(20, 26, (batch,), generator=generator).to(torch.float64)
    ages[0] = 22.5
    return features, ages


BATCHES = [(seed, views) for views in (1, 2, 3) for seed in (0, 1)]
KERNELS = [("rbf", 2.0), ("gaussian", 1.5), ("cauchy", 0.3)]
TOLERANCE = 1e-5


def assert_close(value: torch.Tensor, expected: float) -> None:
    assert abs(float(value) - expected) <= TOLERANCE * max(1.0, abs(expected)), (float(value), expected)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("seed,views", BATCHES)
def test_yaware_matches_loop(seed, views, kernel, sigma):
    features, ages = random_batch(seed, 6, views)
    loss = build_loss("yaware", kernel=kernel, sigma=sigma, temperature=0.2)(features, ages)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_yaware(features, ages, kernel, sigma, 0.2))


@pytest.mark.parametrize("seed,views", BATCHES)
def test_supcon_matches_loop(seed, views):
    features, ages = random_batch(seed, 7, views)
    ages = ages * 2.1 - 20  # spread over several 2-year bins, some below 4
    loss = build_loss("supcon", temperature=0.3)(features, ages)
    assert_close(loss, ref_supcon(features, ages, 0.3))


@pytest.mark.parametrize("views", (2, 3))
def test_supcon_without_ages_is_simclr(views):
    features, _ = random_batch(3, 5, views)
    loss = build_loss("supcon")(features, None)
    assert_close(loss, ref_supcon(features, None, 0.1))


def test_supcon_bins_match_spec_text():
    from brainage_core.losses.yaware import supcon_age_bin

    ages = [-3.0, 0.0, 3.9, 4.0, 4.01, 5.0, 6.0, 6.5, 37.2, 89.0, 90.0, 90.5, 120.0]
    got = supcon_age_bin(torch.tensor(ages, dtype=torch.float64)).tolist()
    assert got == [supcon_bin(y) for y in ages]


@pytest.mark.parametrize("margin", (0.0, 1.5))
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("seed,views", BATCHES)
def test_threshold_paper_matches_loop(seed, views, kernel, sigma, margin):
    features, ages = random_batch(seed, 6, views)
    loss_fn = build_loss("threshold", kernel=kernel, sigma=sigma, form="paper", threshold_margin=margin)
    assert_close(loss_fn(features, ages), ref_threshold_paper(features, ages, kernel, sigma, 0.1, margin))


@pytest.mark.parametrize("delta_reduction", ("sum", "mean"))
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("seed,views", BATCHES)
def test_threshold_reference_matches_loop(seed, views, kernel, sigma, delta_reduction):
    features, ages = random_batch(seed, 6, views)
    loss_fn = build_loss("threshold", kernel=kernel, sigma=sigma, delta_reduction=delta_reduction)
    try:
        expected = ref_threshold_reference(features, ages, kernel, sigma, 0.1, delta_reduction)
    except ZeroDivisionError as empty:  # D_a = 0 (V = 1, an extreme anchor): the loss must refuse it
        with pytest.raises(LossError, match=f"anchor {empty.args[0]} "):
            loss_fn(features, ages)
        return
    assert_close(loss_fn(features, ages), expected)


def test_threshold_reference_underflowed_kernel_ties_not_counted():
    # rbf with a narrow σ underflows to exactly 0 between distant ages: those zeros tie, not counted
    features, _ = random_batch(5, 6, 2)
    ages = torch.tensor([20.0, 20.0, 21.0, 60.0, 61.0, 90.0], dtype=torch.float64)
    loss = build_loss("threshold", kernel="rbf", sigma=0.05)(features, ages)
    assert_close(loss, ref_threshold_reference(features, ages, "rbf", 0.05, 0.1, "sum"))


def test_threshold_reference_mean_reduction_shifts_by_log_n_with_equal_gradients():
    features, ages = random_batch(4, 6, 2)
    grads, values = [], []
    for reduction in ("sum", "mean"):
        x = features.clone().requires_grad_(True)
        value = build_loss("threshold", kernel="rbf", delta_reduction=reduction)(x, ages)
        value.backward()
        values.append(value.item())
        grads.append(x.grad)
    assert values[1] - values[0] == pytest.approx(-(0.1 / TAU0) * math.log(12), abs=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ("reference", "paper"))
@pytest.mark.parametrize("kernel,sigma", [("rbf", 2.0), ("gaussian", 0.5), ("cauchy", 0.3)])
@pytest.mark.parametrize("seed,views", BATCHES)
def test_expw_matches_loop(seed, views, kernel, sigma, form):
    features, ages = random_batch(seed, 6, views)
    loss = build_loss("expw", kernel=kernel, sigma=sigma, form=form, temperature=0.25)(features, ages)
    assert_close(loss, ref_expw(features, ages, kernel, sigma, 0.25, form))


@pytest.mark.parametrize("seed,views", BATCHES)
def test_rnc_matches_loop_on_unnormalised_features(seed, views):
    features, ages = random_batch(seed, 6, views, normalise=False)
    features = features * 3.0
    loss = build_loss("rnc")(features, ages)
    assert_close(loss, ref_rnc(features, ages, 2.0))
    assert_close(build_loss("rnc", temperature=0.5)(features, ages), ref_rnc(features, ages, 0.5))


@pytest.fixture
def log_space_tails(monkeypatch):
    """Force the log-space fallback of the ranked tail sums (used when a row spans ≥ 600 in s)."""
    import brainage_core.losses.ranking as ranking

    monkeypatch.setattr(ranking, "LINEAR_RANGE_LIMITS", {})


@pytest.mark.parametrize("seed,views", BATCHES)
def test_ranked_losses_log_space_fallback_matches_loop(seed, views, log_space_tails):
    features, ages = random_batch(seed, 6, views)
    for margin in (0.0, 1.5):
        loss_fn = build_loss("threshold", kernel="cauchy", sigma=0.3, form="paper", threshold_margin=margin)
        assert_close(loss_fn(features, ages), ref_threshold_paper(features, ages, "cauchy", 0.3, 0.1, margin))
    assert_close(build_loss("rnc")(features * 3, ages), ref_rnc(features * 3, ages, 2.0))


@pytest.mark.parametrize("method,options", [("threshold", {"kernel": "rbf", "form": "paper"}), ("rnc", {})])
def test_ranked_losses_log_space_fallback_gradcheck(method, options, log_space_tails):
    raw, ages = random_batch(7, 4, 2, dim=3, normalise=False)
    loss_fn = build_loss(method, temperature=0.5, **options)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return loss_fn(x if method == "rnc" else F.normalize(x, dim=-1), ages)

    assert torch.autograd.gradcheck(loss_of, (raw.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_wide_similarity_rows_take_the_log_space_path_and_stay_finite():
    features, ages = random_batch(10, 8, 2, dim=8, normalise=False)
    for method, scale, tau in (("rnc", 1000.0, 0.01), ("threshold", 1.0, 0.001)):
        x = (F.normalize(features, dim=-1) * scale).float().requires_grad_(True)
        options = {"kernel": "rbf", "form": "paper"} if method == "threshold" else {}
        loss = build_loss(method, temperature=tau, **options)(x, ages.float())
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), method


@pytest.mark.parametrize("temperature", (0.1, 0.01))
def test_float32_float64_and_log_space_tails_agree(monkeypatch, temperature):
    import brainage_core.losses.ranking as ranking

    features, ages = random_batch(11, 64, 2, dim=16)
    features, ages = features.float(), ages.float() * 3
    cases = (("threshold", {"kernel": "rbf", "form": "paper"}), ("threshold", {"kernel": "rbf", "form": "paper",
             "threshold_margin": 2.0}), ("rnc", {}))
    values = []
    # τ = 0.1: float32 linear sums; τ = 0.01: float64 linear sums (rows span up to 200); then log space
    for limits in (dict(ranking.LINEAR_RANGE_LIMITS), {torch.float64: 600.0}, {}):
        monkeypatch.setattr(ranking, "LINEAR_RANGE_LIMITS", limits)
        values.append([build_loss(m, temperature=temperature, **o)(features, ages).item() for m, o in cases])
    assert values[0] == pytest.approx(values[2], rel=1e-5)
    assert values[1] == pytest.approx(values[2], rel=1e-5)


def testtie_group_bounds_equal_a_binary_search():
    from brainage_core.losses.ranking import tie_group_bounds

    generator = torch.Generator().manual_seed(12)
    for size in (1, 2, 7, 30):
        ages = torch.randint(0, 6, (size,), generator=generator).double() * 0.7
        distances = (ages[:, None] - ages[None, :]).abs()
        ascending, order = torch.sort(distances, dim=1)
        for after in (True, False):
            expected = torch.searchsorted(ascending, distances, right=after)
            assert torch.equal(tie_group_bounds(ascending, order, after=after), expected)


@pytest.mark.parametrize("method", SUPERVISED_METHODS)
def test_supervised_losses(method):
    predictions = torch.tensor([30.0, 41.0, 55.5], dtype=torch.float64)
    ages = torch.tensor([32.0, 40.0, 50.0], dtype=torch.float64)
    errors = [p - y for p, y in zip(predictions.tolist(), ages.tolist())]
    expected = sum(abs(e) if method == "l1" else e * e for e in errors) / 3
    assert_close(build_loss(method)(predictions, ages), expected)


def test_anchors_without_positives_are_left_out_of_the_mean():
    # V = 1: subjects alone in their 2-year bin have no positive and are excluded
    features, _ = random_batch(6, 6, 1)
    ages = torch.tensor([21.0, 21.5, 30.0, 40.0, 41.0, 70.0], dtype=torch.float64)
    loss = build_loss("supcon")(features, ages)
    assert torch.isfinite(loss)
    assert_close(loss, ref_supcon(features, ages, 0.1))
    # a narrow rbf underflows every weight except between equal ages
    ages = torch.tensor([21.0, 21.0, 30.0, 40.0, 40.0, 70.0], dtype=torch.float64)
    loss = build_loss("yaware", kernel="rbf", sigma=0.01)(features, ages)
    assert_close(loss, ref_yaware(features, ages, "rbf", 0.01, 0.1))


# ----------------------------------------------------------------------------------------------
# gradients and stability
# ----------------------------------------------------------------------------------------------

GRAD_CASES = [
    ("yaware", {"kernel": "rbf", "sigma": 2.0}),
    ("supcon", {}),
    ("threshold", {"kernel": "gaussian", "sigma": 2.0}),
    ("threshold", {"kernel": "cauchy", "form": "paper", "threshold_margin": 0.5}),
    ("expw", {"kernel": "rbf", "sigma": 2.0}),
    ("expw", {"kernel": "cauchy", "form": "paper"}),
    ("rnc", {}),
]


@pytest.mark.parametrize("method,options", GRAD_CASES)
def test_gradcheck_float64(method, options):
    raw, ages = random_batch(7, 4, 2, dim=3, normalise=False)
    ages = ages * 2.1 - 20 if method == "supcon" else ages
    loss_fn = build_loss(method, temperature=0.5, **options)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return loss_fn(x if method == "rnc" else F.normalize(x, dim=-1), ages)

    assert torch.autograd.gradcheck(loss_of, (raw.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


ALL_CASES = GRAD_CASES + [
    ("threshold", {"kernel": "rbf", "form": "paper"}),
    ("expw", {"kernel": "gaussian", "form": "reference"}),
]


@pytest.mark.parametrize("method,options", ALL_CASES)
def test_small_temperature_under_bf16_autocast_is_finite(method, options):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 32)
    x = torch.randn(16, 2, 16, generator=generator)
    ages = torch.randint(20, 80, (16,), generator=generator).float()
    loss_fn = build_loss(method, temperature=0.01, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = head(x)
        if method != "rnc":
            features = F.normalize(features.float(), dim=-1)
        features = features.to(torch.bfloat16)
        loss = loss_fn(features, ages)
    assert features.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss), float(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_rnc_identical_views_have_finite_gradients():
    features, ages = random_batch(8, 5, 1, normalise=False)
    features = features.repeat(1, 2, 1).requires_grad_(True)
    loss = build_loss("rnc")(features, ages)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()


def test_loss_is_vectorised_on_larger_batches():
    # N = 256: would take minutes with the loops above; here a blink, and every method agrees on dtype
    features, ages = random_batch(9, 128, 2, dim=32)
    for method, options in ALL_CASES:
        loss = build_loss(method, **options)(features, ages)
        assert loss.shape == () and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# bad inputs: one clear error naming the parameter and the value received
# ----------------------------------------------------------------------------------------------

BAD_BUILDS = [
    ({"method": "simclr2"}, r"'method'.*'simclr2'"),
    ({"method": "yaware", "kernel": "laplace"}, r"'kernel'.*'laplace'"),
    ({"method": "yaware"}, r"'kernel' is required.*None"),
    ({"method": "supcon", "kernel": "rbf"}, r"'kernel'.*'rbf'"),
    ({"method": "rnc", "kernel": "rbf"}, r"'kernel'.*'rbf'"),
    ({"method": "l1", "kernel": "rbf"}, r"'kernel'.*'rbf'"),
    ({"method": "yaware", "kernel": "rbf", "sigma": 0.0}, r"'sigma'.*0\.0"),
    ({"method": "threshold", "kernel": "cauchy", "sigma": -1.0}, r"'sigma'.*-1\.0"),
    ({"method": "yaware", "kernel": "rbf", "temperature": 0.0}, r"'temperature'.*0\.0"),
    ({"method": "rnc", "temperature": -2.0}, r"'temperature'.*-2\.0"),
    ({"method": "yaware", "kernel": "rbf", "base_temperature": 0.0}, r"'base_temperature'.*0\.0"),
    ({"method": "threshold", "kernel": "rbf", "form": "papr"}, r"'form'.*'papr'"),
    ({"method": "yaware", "kernel": "rbf", "form": "paper"}, r"'form'.*'paper'"),
    ({"method": "threshold", "kernel": "rbf", "delta_reduction": "max"}, r"'delta_reduction'.*'max'"),
    ({"method": "threshold", "kernel": "rbf", "form": "paper", "delta_reduction": "mean"}, r"'delta_reduction'"),
    ({"method": "threshold", "kernel": "rbf", "form": "paper", "threshold_margin": -1.0}, r"'threshold_margin'.*-1"),
    ({"method": "threshold", "kernel": "rbf", "threshold_margin": 2.0}, r"'threshold_margin'.*2\.0.*'reference'"),
    ({"method": "expw", "kernel": "gaussian", "sigma": 0.3}, r"'sigma'.*0\.3"),
    ({"method": "yaware", "kernel": "rbf", "gather_distributed": "yes"}, r"'gather_distributed'.*'yes'"),
]


@pytest.mark.parametrize("options,message", BAD_BUILDS)
def test_build_loss_refuses_bad_parameters(options, message):
    options = dict(options)
    method = options.pop("method")
    with pytest.raises(LossError, match=message):
        build_loss(method, **options)


def test_build_loss_defaults_follow_the_spec():
    assert build_loss("rnc").temperature == 2.0
    yaware = build_loss("yaware", kernel="cauchy")
    assert (yaware.temperature, yaware.base_temperature, yaware.kernel.sigma) == (0.1, 0.07, 1.0)
    threshold = build_loss("threshold", kernel="rbf")
    assert (threshold.form, threshold.delta_reduction, threshold.threshold_margin) == ("reference", "sum", 0.0)
    assert build_loss("expw", kernel="rbf").form == "reference"
    assert build_loss("supcon", sigma=1.0).temperature == 0.1  # a config's sigma is harmless without a kernel
    assert set(CONTRASTIVE_METHODS) == {"yaware", "supcon", "threshold", "expw", "rnc"}
    assert set(SUPERVISED_METHODS) == {"l1", "mse"}


def test_expw_accepts_gaussian_at_the_bound():
    build_loss("expw", kernel="gaussian", sigma=1 / math.sqrt(2 * math.pi) + 1e-12)


@pytest.mark.parametrize("method", CONTRASTIVE_METHODS)
def test_shape_mismatch_names_both_shapes(method):
    loss_fn = build_loss(method, kernel="rbf" if method in ("yaware", "threshold", "expw") else None)
    features, _ = random_batch(0, 4, 2)
    with pytest.raises(LossError, match=r"'ages'.*\(4,\).*\(5,\)"):
        loss_fn(features, torch.arange(5.0) + 20)
    with pytest.raises(LossError, match=r"'features'.*\(8, 5\)"):
        loss_fn(features.reshape(8, 5), torch.arange(8.0) + 20)


@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
@pytest.mark.parametrize("method", CONTRASTIVE_METHODS + SUPERVISED_METHODS)
def test_non_finite_ages_are_named(method, bad):
    loss_fn = build_loss(method, kernel="rbf" if method in ("yaware", "threshold", "expw") else None)
    features, ages = random_batch(0, 4, 2)
    if method in SUPERVISED_METHODS:
        features = ages.clone()
    ages[2] = bad
    with pytest.raises(LossError, match=rf"'ages'.*ages\[2\] = {bad}"):
        loss_fn(features, ages)


@pytest.mark.parametrize("method", ("yaware", "supcon", "threshold", "expw"))
def test_non_unit_norm_features_are_refused(method):
    loss_fn = build_loss(method, kernel=None if method == "supcon" else "rbf")
    features, ages = random_batch(0, 4, 2)
    features[1, 0] *= 1.01
    with pytest.raises(LossError, match=r"'features'.*L2-normalised.*features\[1, 0\].*1\.01"):
        loss_fn(features, ages)
    # within 1e-3 is accepted, as is 1e-2 for bf16 inputs
    features, ages = random_batch(0, 4, 2)
    loss_fn(features * (1 + 5e-4), ages)
    loss_fn((features * (1 + 5e-3)).to(torch.bfloat16), ages)
    with pytest.raises(LossError, match=r"'features'"):
        loss_fn(features * (1 + 5e-3), ages)


def test_threshold_reference_all_equal_ages_names_anchor_and_age():
    features, _ = random_batch(0, 4, 2)
    ages = torch.full((4,), 30.0, dtype=torch.float64)
    with pytest.raises(LossError, match=r"D_a = 0 for anchor 0 .*age 30"):
        build_loss("threshold", kernel="rbf")(features, ages)
    # the paper form is well defined there (every denominator holds its positive)
    assert torch.isfinite(build_loss("threshold", kernel="rbf", form="paper")(features, ages))


def test_no_anchor_with_positives_is_an_error():
    features, _ = random_batch(0, 4, 1)
    with pytest.raises(LossError, match=r"no anchor has a positive"):
        build_loss("supcon")(features, torch.tensor([20.0, 30.0, 40.0, 50.0]))
    with pytest.raises(LossError, match=r"no anchor has a positive"):
        build_loss("supcon")(features, None)  # SimCLR needs V >= 2


def test_supervised_shape_errors():
    with pytest.raises(LossError, match=r"'predictions'.*\(3, 1\)"):
        build_loss("l1")(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(LossError, match=r"'ages'.*\(3,\).*\(4,\)"):
        build_loss("mse")(torch.zeros(3), torch.zeros(4))


def test_ages_required_for_age_losses():
    features, _ = random_batch(0, 4, 2)
    with pytest.raises(LossError, match=r"'ages'.*None"):
        build_loss("yaware", kernel="rbf")(features, None)


def test_gather_requires_initialised_process_group():
    features, ages = random_batch(0, 4, 2)
    with pytest.raises(LossError, match=r"'gather_distributed'.*not initialised"):
        build_loss("yaware", kernel="rbf", gather_distributed=True)(features, ages)
