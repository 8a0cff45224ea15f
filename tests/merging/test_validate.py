"""Weight validation and model compatibility checks."""

from __future__ import annotations

import math

import pytest
import torch

from resilient_tune.errors import IncompatibleModelsError, UsageError
from resilient_tune.merging import check_compatible, validate_weights


def test_linear_weights_summing_to_one_pass_unchanged() -> None:
    weights = [0.25, 0.75]
    out = validate_weights(weights, 2)
    assert out == [0.25, 0.75] and out is not weights
    assert validate_weights([0.3, 0.3, 0.4005], 3) == [0.3, 0.3, 0.4005]  # within 1e-3


@pytest.mark.parametrize("weights", [[0.5, 0.49], [0.5, 0.51], [0.6, 0.6], [0.0, 0.0]])
def test_linear_sum_checked_on_both_sides(weights: list[float]) -> None:
    with pytest.raises(UsageError) as info:
        validate_weights(weights, 2, method="linear")
    message = str(info.value)
    assert f"{math.fsum(weights):g}" in message
    assert "normalize=True" in message


def test_normalize_divides_by_the_sum() -> None:
    assert validate_weights([1.0, 3.0], 2, normalize=True) == [0.25, 0.75]
    assert validate_weights([2.0, 2.0], 2, method="ties", normalize=True) == [0.5, 0.5]


def test_normalize_with_zero_sum_is_an_error() -> None:
    with pytest.raises(UsageError, match="nonzero sum"):
        validate_weights([1.0, -1.0], 2, normalize=True)
    with pytest.raises(UsageError, match="nonzero sum"):
        validate_weights([0.0, 0.0], 2, method="task_arithmetic", normalize=True)


def test_task_vector_weights_need_not_sum_to_one() -> None:
    assert validate_weights([1.0, 1.0, 1.0], 3, method="ties") == [1.0, 1.0, 1.0]
    assert validate_weights([0.3], 1, method="task_arithmetic") == [0.3]
    assert validate_weights([-0.5, 2.0], 2, method="dare_linear") == [-0.5, 2.0]


def test_weight_count_must_match() -> None:
    with pytest.raises(UsageError, match="got 2 weights for 3 models"):
        validate_weights([0.5, 0.5], 3)
    with pytest.raises(UsageError, match="at least one model"):
        validate_weights([], 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_rejected(bad: float) -> None:
    with pytest.raises(UsageError, match="weight 1 is"):
        validate_weights([1.0, bad], 2, method="ties", normalize=True)


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_non_numbers_are_rejected(bad: object) -> None:
    with pytest.raises(UsageError, match="real number"):
        validate_weights([0.5, bad], 2)  # type: ignore[list-item]
    with pytest.raises(UsageError, match="sequence"):
        validate_weights("0.5", 1)  # type: ignore[arg-type]


def test_tensor_and_numpy_like_scalars_are_accepted() -> None:
    assert validate_weights(torch.tensor([0.5, 0.5]), 2) == [0.5, 0.5]  # type: ignore[arg-type]
    assert validate_weights([torch.tensor(0.5), 0.5], 2) == [0.5, 0.5]  # type: ignore[list-item]


def test_unknown_method_in_validate_weights() -> None:
    with pytest.raises(UsageError, match="unknown"):
        validate_weights([1.0], 1, method="nope")


def _spec(**tensors: tuple[tuple[int, ...], torch.dtype]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return dict(tensors)


F32, F16, BF16, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int64


def test_compatible_models_pass_with_differing_float_dtypes() -> None:
    a = _spec(w=((2, 3), F32), ids=((4,), I64))
    b = _spec(w=((2, 3), F16), ids=((4,), I64))
    c = _spec(ids=((4,), I64), w=((2, 3), BF16))  # key order does not matter
    check_compatible([a, b, c], ["a", "b", "c"])


def test_missing_key_names_the_model_and_the_key() -> None:
    a = _spec(w=((2,), F32), v=((2,), F32))
    b = _spec(w=((2,), F32))
    with pytest.raises(IncompatibleModelsError) as info:
        check_compatible([a, b], ["/ckpt/a", "/ckpt/b"])
    message = str(info.value)
    assert "/ckpt/b lacks" in message and "'v'" in message and "/ckpt/a" in message


def test_extra_key_names_the_model_and_the_key() -> None:
    a = _spec(w=((2,), F32))
    b = _spec(w=((2,), F32), extra=((1,), F32))
    with pytest.raises(IncompatibleModelsError) as info:
        check_compatible([a, b], ["a", "b"])
    assert "b has tensor 'extra'" in str(info.value)


def test_first_missing_key_is_reported() -> None:
    a = _spec(k1=((1,), F32), k2=((1,), F32), k3=((1,), F32))
    b = _spec(k1=((1,), F32))
    with pytest.raises(IncompatibleModelsError, match="'k2'"):
        check_compatible([a, b], ["a", "b"])


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    a = _spec(w=((2, 3), F32))
    b = _spec(w=((3, 2), F32))
    with pytest.raises(IncompatibleModelsError) as info:
        check_compatible([a, b], ["a", "b"])
    message = str(info.value)
    assert "'w'" in message and "(2, 3)" in message and "(3, 2)" in message


@pytest.mark.parametrize(
    ("left", "right"), [(F32, I64), (I64, F16), (torch.int32, I64), (torch.bool, torch.uint8)]
)
def test_float_vs_int_and_different_int_dtypes_are_incompatible(
    left: torch.dtype, right: torch.dtype
) -> None:
    with pytest.raises(IncompatibleModelsError, match="only floating-point dtypes may differ"):
        check_compatible([_spec(x=((2,), left)), _spec(x=((2,), right))], ["a", "b"])


def test_check_compatible_argument_errors() -> None:
    with pytest.raises(UsageError, match="one name per model"):
        check_compatible([_spec(), _spec()], ["a"])
    with pytest.raises(UsageError, match="at least one"):
        check_compatible([], [])
    check_compatible([_spec(w=((1,), F32))], ["only"])  # a single model is trivially compatible
