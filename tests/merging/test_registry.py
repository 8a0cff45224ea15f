"""The method registry, option resolution and the package's public surface."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path

import pytest

import resilient_tune.merging as merging
from resilient_tune.errors import UsageError
from resilient_tune.merging import METHODS, MergeMethod, get_method, method_names, resolve_options

EXPECTED = {
    # name: (needs_base, sparsify, consensus, depth_scaling, options, arXiv id)
    "linear": (False, None, None, False, set(), "2203.05482"),
    "task_arithmetic": (True, None, None, False, {"lambda"}, "2212.04089"),
    "ties": (True, "magnitude", "sign", False, {"lambda", "density"}, "2306.01708"),
    "dare_linear": (True, "random", None, False, {"lambda", "density"}, "2311.03099"),
    "dare_ties": (True, "random", "sign", False, {"lambda", "density"}, "2311.03099"),
    "breadcrumbs": (True, "outliers", None, False, {"lambda", "density", "gamma"}, "2312.06795"),
    "breadcrumbs_ties": (True, "outliers", "sign", False, {"lambda", "density", "gamma"}, "2312.06795"),
    "lines": (True, None, None, True, {"lambda", "lines_alpha", "lines_beta"}, "2410.17146"),
    "della": (True, "magnitude_rank", "sign", False, {"lambda", "density", "epsilon"}, "2406.11617"),
    "della_linear": (True, "magnitude_rank", None, False, {"lambda", "density", "epsilon"}, "2406.11617"),
    "slerp": (True, None, None, False, {"t"}, "2403.13257"),
    "model_stock": (True, None, None, False, set(), "2403.19522"),
}
COMBINE = {
    "slerp": ("slerp", (1, 1)),
    "model_stock": ("model_stock", (2, None)),
}  # the others: ("sum", (1, None))


def test_all_is_sorted_and_lists_exactly_the_public_names() -> None:
    # the linter's order (ruff RUF022): CONSTANTS, then Classes, then functions, each alphabetical
    kind = lambda name: (0 if name.isupper() else 1 if name[0].isupper() else 2, name)  # noqa: E731
    assert merging.__all__ == sorted(merging.__all__, key=kind)
    public = {name for name in vars(merging) if not name.startswith("_")}
    assert public == set(merging.__all__)
    for name in merging.__all__:
        assert getattr(merging, name) is not None


def test_registry_rows_match_the_documented_table() -> None:
    assert method_names() == list(EXPECTED)
    for name, (needs_base, sparsify, consensus, depth, options, arxiv) in EXPECTED.items():
        row = METHODS[name]
        assert row.name == name
        assert (row.needs_base, row.sparsify, row.consensus, row.depth_scaling) == (
            needs_base,
            sparsify,
            consensus,
            depth,
        )
        assert set(row.defaults) == options
        assert (row.combine, row.inputs) == COMBINE.get(name, ("sum", (1, None)))
        assert arxiv in row.paper and row.paper.startswith("https://arxiv.org/abs/")
        assert row.description and "\n" not in row.description


def test_linear_cites_lm_cocktail_too() -> None:
    assert "2311.13534" in METHODS["linear"].paper


def test_registry_and_rows_are_read_only() -> None:
    with pytest.raises(TypeError):
        METHODS["mine"] = METHODS["linear"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["ties"].density = 0.3  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        METHODS["ties"].defaults["density"] = 0.3  # type: ignore[index]
    assert isinstance(hash(METHODS["ties"]), int)


def test_get_method_unknown_lists_valid_names() -> None:
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(UsageError) as info:
        get_method("karcher")  # mergekit has it; resilient-tune does not
    message = str(info.value)
    assert "'karcher'" in message
    for name in EXPECTED:
        assert name in message


def test_method_row_rejects_unknown_building_blocks() -> None:
    with pytest.raises(UsageError, match="sparsify"):
        MergeMethod("x", True, "topk", None, False, {}, "https://arxiv.org/abs/0", "x")
    with pytest.raises(UsageError, match="consensus"):
        MergeMethod("x", True, None, "count", False, {}, "https://arxiv.org/abs/0", "x")


def test_resolve_options_overlays_defaults_and_is_idempotent() -> None:
    resolved = resolve_options("ties", {"density": 0.2})
    assert resolved == {"lambda": 1.0, "density": 0.2}
    assert resolve_options("ties", resolved) == resolved
    assert resolve_options(METHODS["breadcrumbs"], None) == dict(METHODS["breadcrumbs"].defaults)
    assert resolve_options("linear", None) == {}
    assert isinstance(resolve_options("task_arithmetic", {"lambda": 2})["lambda"], float)


def test_resolve_options_does_not_touch_the_registry() -> None:
    resolve_options("ties", {"density": 0.9})["density"] = 0.1
    assert METHODS["ties"].defaults["density"] == 0.5


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError) as info:
        resolve_options("breadcrumbs", {"epsilon": 0.1})
    message = str(info.value)
    assert "'epsilon'" in message and "'breadcrumbs'" in message
    for name in ("lambda", "density", "gamma"):
        assert name in message
    with pytest.raises(UsageError, match="takes no options"):
        resolve_options("linear", {"lambda": 1.0})


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_density_out_of_range_says_the_range(density: float) -> None:
    with pytest.raises(UsageError) as info:
        resolve_options("ties", {"density": density})
    assert "(0, 1]" in str(info.value) or "finite" in str(info.value)
    assert "density" in str(info.value)


def test_density_range_message_for_zero() -> None:
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        resolve_options("dare_linear", {"density": 0})


def test_density_one_is_valid() -> None:
    assert resolve_options("dare_ties", {"density": 1.0})["density"] == 1.0


@pytest.mark.parametrize("gamma", [-0.01, 1.0, 2.0])
def test_gamma_out_of_range(gamma: float) -> None:
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        resolve_options("breadcrumbs", {"gamma": gamma, "density": 0.1})


def test_density_plus_gamma_must_not_exceed_one() -> None:
    assert resolve_options("breadcrumbs", {"density": 0.7, "gamma": 0.3})["gamma"] == 0.3
    with pytest.raises(UsageError, match="density \\+ gamma <= 1"):
        resolve_options("breadcrumbs", {"density": 0.9, "gamma": 0.2})
    with pytest.raises(UsageError, match="density \\+ gamma"):
        resolve_options("breadcrumbs_ties", {"gamma": 0.5})  # default density 0.9


@pytest.mark.parametrize("name", ["lambda", "lines_alpha", "lines_beta"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_scales_must_be_finite(name: str, value: float) -> None:
    with pytest.raises(UsageError, match="finite"):
        resolve_options("lines", {name: value})


@pytest.mark.parametrize("value", [True, "0.5", None])
def test_option_values_must_be_real_numbers(value: object) -> None:
    with pytest.raises(UsageError, match="real number"):
        resolve_options("ties", {"density": value})  # type: ignore[dict-item]


def test_negative_lambda_is_allowed() -> None:
    assert resolve_options("task_arithmetic", {"lambda": -0.5})["lambda"] == -0.5


def test_the_core_imports_only_torch_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch", "resilient_tune"}
    package = Path(merging.__file__).parent
    # the core, and the one module of entry checks below it (weights, alpha), which imports torch and errors only
    for path in [*sorted(package.glob("*.py")), package.parent / "validation.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
                if roots == ["resilient_tune"]:
                    assert node.module.startswith(
                        ("resilient_tune.merging", "resilient_tune.errors", "resilient_tune.validation")
                    ), (
                        path,
                        node.module,
                    )
            else:
                continue
            assert set(roots) <= allowed, (path.name, roots)
