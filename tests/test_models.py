"""Tests of brainage_core.models: shapes, parameter counts, features(), SyncBatchNorm, errors, export safety.

Parameter counts are recomputed here from the architecture written out as arithmetic (convolution
k^3*c_in*c_out, BatchNorm 2c, Linear d_in*d_out + d_out), independently of the modules, and must
also appear in the family files' docstrings. Forward passes use tiny widths and batch 2 on the 6 mm
grid (AlexNet on its smallest grid, 69^3).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainage_core.errors import ConfigError
from brainage_core.models import (
    BACKBONE_FAMILIES,
    BACKBONES,
    HEADS,
    ContrastiveModel,
    RegressionModel,
    build_model,
    family_source_files,
)

torch.set_num_threads(1)

GRID_6MM = (31, 37, 31)
ALEXNET_SMALLEST = (69, 69, 69)
FORBIDDEN = (
    "subprocess", "popen", "shutil", "rmtree", "copytree", "fdopen", "fchmod", "fchown", "ftruncate",
    "open", "listdir", "scandir", "removedirs",
)  # fmt: skip
MODELS_DIR = Path(__file__).resolve().parents[1] / "brainage_core" / "models"
SELF_CONTAINED_FILES = ("resnet3d.py", "densenet3d.py", "alexnet3d.py", "heads.py")


def smallest_grid(backbone: str) -> tuple[int, int, int]:
    return ALEXNET_SMALLEST if backbone == "alexnet3d" else GRID_6MM


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- parameter counts from the architecture formulas ------------------------------------------


def conv(c_in: int, c_out: int, k: int, bias: bool = False) -> int:
    return k**3 * c_in * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def resnet_formula(block: str, layers: tuple[int, ...], w: int) -> tuple[int, int]:
    """(parameters, output width) of a 3D ResNet: 7^3 stem, stages w·2^i, stride 2 from stage 2."""
    expansion = 1 if block == "basic" else 4
    total = conv(1, w, 7) + bn(w)
    c_in = w
    for stage, n_blocks in enumerate(layers):
        p = w * 2**stage
        for index in range(n_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            if block == "basic":
                total += conv(c_in, p, 3) + bn(p) + conv(p, p, 3) + bn(p)
            else:
                total += conv(c_in, p, 1) + bn(p) + conv(p, p, 3) + bn(p) + conv(p, 4 * p, 1) + bn(4 * p)
            if stride != 1 or c_in != p * expansion:
                total += conv(c_in, p * expansion, 1) + bn(p * expansion)
            c_in = p * expansion
    return total, c_in


def densenet_formula(growth: int, blocks: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, output width) of DenseNet-BC: stem 2k, bottleneck 4k, compression 0.5, final BN."""
    c = 2 * growth
    total = conv(1, c, 7) + bn(c)
    for index, n_layers in enumerate(blocks):
        for _ in range(n_layers):
            total += bn(c) + conv(c, 4 * growth, 1) + bn(4 * growth) + conv(4 * growth, growth, 3)
            c += growth
        if index < len(blocks) - 1:
            total += bn(c) + conv(c, c // 2, 1)
            c //= 2
    return total + bn(c), c


def alexnet_formula(w: int) -> tuple[int, int]:
    """(parameters, output width) of Abrol's 3D AlexNet: convs with bias, widths w, 2w, 3w, 3w, 2w."""
    widths = [(1, w, 5), (w, 2 * w, 3), (2 * w, 3 * w, 3), (3 * w, 3 * w, 3), (3 * w, 2 * w, 3)]
    return sum(conv(a, b, k, bias=True) + bn(b) for a, b, k in widths), 2 * w


FORMULAS = {
    "resnet18": lambda w: resnet_formula("basic", (2, 2, 2, 2), w),
    "resnet34": lambda w: resnet_formula("basic", (3, 4, 6, 3), w),
    "resnet50": lambda w: resnet_formula("bottleneck", (3, 4, 6, 3), w),
    "densenet121": lambda w: densenet_formula(w // 2, (6, 12, 24, 16)),
    "alexnet3d": alexnet_formula,
}
REFERENCE_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "densenet121": 1024, "alexnet3d": 128}


def test_every_backbone_has_a_formula() -> None:
    assert set(FORMULAS) == set(BACKBONES) == set(BACKBONE_FAMILIES)


@pytest.mark.parametrize("backbone", sorted(FORMULAS))
def test_parameter_count_at_reference_width_matches_formula_and_docstring(backbone: str) -> None:
    expected, width = FORMULAS[backbone](64)
    assert width == REFERENCE_WIDTHS[backbone]
    with torch.device("meta"):
        contrastive = build_model(backbone, "contrastive")
        regression = build_model(backbone, "regression")
    assert n_params(contrastive.encoder) == expected
    assert contrastive.encoder.out_features == width
    assert n_params(contrastive.head) == (width * width + width) + (width * 128 + 128)
    assert n_params(regression.head) == width + 1
    family_text = family_source_files(backbone)[0].read_text()
    assert f"{expected:,}" in family_text, f"{backbone}: docstring does not state {expected:,} parameters"
    assert f"{expected:,}" in (MODELS_DIR / "__init__.py").read_text()


@pytest.mark.parametrize("backbone", sorted(FORMULAS))
@pytest.mark.parametrize("base_width", [8, 16])
def test_parameter_count_scales_with_base_width(backbone: str, base_width: int) -> None:
    expected, width = FORMULAS[backbone](base_width)
    with torch.device("meta"):
        encoder = build_model(backbone, "regression", base_width=base_width).encoder
    assert (n_params(encoder), encoder.out_features) == (expected, width)


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_output_shapes_on_smallest_supported_grid(backbone: str, head: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, head, base_width=4)
    x = torch.randn(2, 1, *smallest_grid(backbone))
    out = model(x)
    d = FORMULAS[backbone](4)[1]
    if head == "contrastive":
        assert isinstance(model, ContrastiveModel)
        assert out.shape == (2, 128)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
        assert model.features(x).shape == (2, 128)
    else:
        assert isinstance(model, RegressionModel)
        assert out.shape == (2,)
        assert model.features(x).shape == (2, d)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("backbone", "shape"),
    [
        ("resnet18", (121, 145, 121)),
        ("resnet50", (61, 73, 61)),
        ("densenet121", (128, 128, 128)),
        ("densenet121", (61, 73, 61)),
        ("alexnet3d", (121, 145, 121)),
        ("alexnet3d", (128, 128, 128)),
    ],
)
def test_larger_grids_pool_to_the_encoder_width(backbone: str, shape: tuple[int, int, int]) -> None:
    model = build_model(backbone, "regression", base_width=2).eval()
    with torch.inference_mode():
        assert model.features(torch.randn(1, 1, *shape)).shape == (1, FORMULAS[backbone](2)[1])


def test_proj_dim_option() -> None:
    model = build_model("resnet18", "contrastive", base_width=4, proj_dim=16)
    assert model(torch.randn(2, 1, *GRID_6MM)).shape == (2, 16)
    assert model.feature_dim == 16


# --- features() --------------------------------------------------------------------------------


def test_contrastive_features_are_the_normalised_projection_even_without_normalize() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "contrastive", base_width=4, normalize=False).eval()
    x = torch.randn(2, 1, *GRID_6MM)
    with torch.no_grad():
        raw = model.head(model.encoder(x))
        torch.testing.assert_close(model(x), raw)
        assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(model.features(x), F.normalize(raw, dim=1))


def test_contrastive_encoder_feature_option_and_regression_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, *GRID_6MM)
    contrastive = build_model("densenet121", "contrastive", base_width=4, feature="encoder").eval()
    regression = build_model("densenet121", "regression", base_width=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(contrastive.features(x), contrastive.encoder(x))
        torch.testing.assert_close(regression.features(x), regression.encoder(x))
        torch.testing.assert_close(regression(x), regression.head(regression.encoder(x))[:, 0])
    assert contrastive.feature_dim == regression.feature_dim == 64


def test_bf16_autocast_output_is_float32_unit_norm() -> None:
    model = build_model("resnet18", "contrastive", base_width=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(torch.randn(2, 1, *GRID_6MM))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


def test_channels_last_3d_gives_the_same_output() -> None:
    torch.manual_seed(0)
    model = build_model("resnet34", "contrastive", base_width=4).eval()
    x = torch.randn(2, 1, *GRID_6MM)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        result = model(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


# --- SyncBatchNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121", "alexnet3d"])
def test_sync_batchnorm_converts_every_batchnorm(backbone: str) -> None:
    torch.manual_seed(0)
    plain = build_model(backbone, "contrastive", base_width=4).eval()
    synced = build_model(backbone, "contrastive", base_width=4, sync_batchnorm=True).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in plain.modules())
    assert n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm3d) for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, *smallest_grid(backbone))
    with torch.no_grad():
        torch.testing.assert_close(synced(x), plain(x))


# --- errors ------------------------------------------------------------------------------------


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="resnet19") as info:
        build_model("resnet19", "contrastive")
    assert all(name in str(info.value) for name in BACKBONES)


def test_unknown_head_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"'linear'.*contrastive, regression"):
        build_model("resnet18", "linear")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError, match=r"'width'.*base_width, sync_batchnorm, feature, normalize, proj_dim"):
        build_model("resnet18", "contrastive", width=16)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"base_width": 0}, r"model\.base_width.*positive integer.*0"),
        ({"base_width": True}, r"model\.base_width.*True"),
        ({"proj_dim": 12.5}, r"model\.proj_dim.*12\.5"),
        ({"feature": "penultimate"}, r"model\.feature.*'penultimate'.*projection, encoder"),
        ({"normalize": "yes"}, r"model\.normalize.*'yes'"),
        ({"sync_batchnorm": 1}, r"model\.sync_batchnorm.*1"),
    ],
)
def test_bad_option_values(options: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_model("resnet18", "contrastive", **options)


def test_densenet_needs_even_base_width() -> None:
    with pytest.raises(ConfigError, match=r"densenet121.*even.*7"):
        build_model("densenet121", "contrastive", base_width=7)


def test_alexnet_refuses_the_6mm_grid_naming_the_shape() -> None:
    model = build_model("alexnet3d", "contrastive", base_width=4)
    with pytest.raises(ValueError, match=r"alexnet3d.*69.*\(2, 1, 31, 37, 31\)"):
        model(torch.randn(2, 1, *GRID_6MM))
    with pytest.raises(ValueError, match=r"\(2, 1, 68, 69, 69\)"):
        model(torch.randn(2, 1, 68, 69, 69))


def test_densenet_refuses_inputs_below_its_smallest_size() -> None:
    model = build_model("densenet121", "regression", base_width=2)
    with pytest.raises(ValueError, match=r"29.*\(1, 1, 28, 40, 40\)"):
        model(torch.randn(1, 1, 28, 40, 40))
    assert model.eval()(torch.randn(1, 1, 29, 29, 29)).shape == (1,)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_wrong_channel_count_names_the_shape(backbone: str) -> None:
    model = build_model(backbone, "regression", base_width=2)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\).*\(2, 3, "):
        model(torch.randn(2, 3, *smallest_grid(backbone)))


# --- export safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SELF_CONTAINED_FILES)
def test_self_contained_file_has_no_forbidden_words_and_imports_only_torch(name: str) -> None:
    text = (MODELS_DIR / name).read_text()
    lowered = text.lower()
    found = [word for word in FORBIDDEN if word in lowered]
    assert not found, f"{name} contains RAMP-sanitizer words {found}"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name == "torch" or alias.name.startswith("torch."), f"{name}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"
            module = node.module or ""
            assert module == "__future__" or module == "torch" or module.startswith("torch."), (
                f"{name}: from {module} import"
            )


def test_forbidden_word_scan_catches_a_violation() -> None:
    sample = "# data from OpenBHB\nimport torch\n"
    assert [word for word in FORBIDDEN if word in sample.lower()] == ["open"]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_inlined_family_and_heads_rebuild_the_same_model(backbone: str) -> None:
    """What study/export.py does: concatenate the files (one __future__ line) and build from them."""
    sources = [path.read_text() for path in family_source_files(backbone)]
    body = "\n".join(re.sub(r"^from __future__ import annotations\n", "", s, flags=re.M) for s in sources)
    namespace: dict = {"__name__": "estimator"}
    exec(compile("from __future__ import annotations\n" + body, "estimator.py", "exec"), namespace)
    encoder = namespace[backbone](4)
    inlined = namespace["ContrastiveModel"](encoder, proj_dim=128, normalize=True, feature="projection")
    built = build_model(backbone, "contrastive", base_width=4)
    inlined.load_state_dict(built.state_dict())
    x = torch.randn(2, 1, *smallest_grid(backbone))
    with torch.no_grad():
        torch.testing.assert_close(inlined.eval()(x), built.eval()(x))
