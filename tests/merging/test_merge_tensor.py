"""merge_tensor: every method on hand-computed values, dtypes, buffers, errors, laziness, no mutation."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
from _contract import fit  # tests/ is on sys.path (tests/conftest.py)

from resilient_tune.errors import IncompatibleModelsError, NonFiniteError, UsageError
from resilient_tune.merging import METHODS, OwnedLoader, merge_tensor, method_names, resolve_options

T = torch.tensor
TASK_METHODS = [name for name in method_names() if METHODS[name].needs_base]

# --- hand-computed values ------------------------------------------------------------------------


def test_linear_weighted_sum() -> None:
    out = merge_tensor("linear", [T([1.0, 2.0]), T([3.0, 6.0])], [0.25, 0.75])
    assert torch.equal(out, T([2.5, 5.0]))


def test_task_arithmetic() -> None:
    base = T([1.0, 1.0])
    # τ = [1, -1], [2, 4]; Σ w τ = [1, -1] + 0.5 * [2, 4] = [2, 1]; base + 2 * [2, 1]
    out = merge_tensor(
        "task_arithmetic", [T([2.0, 0.0]), T([3.0, 5.0])], [1.0, 0.5], base=base, options={"lambda": 2.0}
    )
    assert torch.equal(out, T([5.0, 3.0]))


def test_ties_trims_elects_by_weighted_mass_and_divides_by_agreeing_weights() -> None:
    base = T([10.0, 10.0, 10.0, 10.0])
    tau1, tau2 = T([4.0, -1.0, 2.0, -3.0]), T([-2.0, 3.0, -1.0, 1.0])
    # density 0.5 keeps 2 entries each: τ1' = [4, 0, 0, -3], τ2' = [-2, 3, 0, 0]
    # weighted (w = 1, 2): [4, 0, 0, -3] + [-4, 6, 0, 0] = [0, 6, 0, -3] -> signs [+, +, +, -]
    # entry 0: only τ1 agrees -> 4/1; entry 1: τ2 -> 2*3/2; entry 2: nobody -> 0; entry 3: τ1 -> -3/1
    out = merge_tensor("ties", [base + tau1, base + tau2], [1.0, 2.0], base=base, options={"density": 0.5})
    assert torch.equal(out, base + T([4.0, 3.0, 0.0, -3.0]))
    # lambda scales the merged task vector
    out = merge_tensor(
        "ties", [base + tau1, base + tau2], [1.0, 2.0], base=base, options={"density": 0.5, "lambda": 0.5}
    )
    assert torch.equal(out, base + T([2.0, 1.5, 0.0, -1.5]))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ties", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
        ("breadcrumbs_ties", {"density": 1.0, "gamma": 0.0}),
    ],
)
def test_sign_consensus_without_sparsification(method: str, options: dict[str, float]) -> None:
    tau1, tau2 = T([4.0, -1.0, 2.0, -3.0]), T([-2.0, 3.0, -1.0, 1.0])
    # weighted (w = 1, 2): [4, -1, 2, -3] + [-4, 6, -2, 2] = [0, 5, 0, -1] -> signs [+, +, +, -]
    # entry 0: τ1 4/1; entry 1: τ2 2*3/2; entry 2: τ1 2/1; entry 3: τ1 -3/1
    out = merge_tensor(method, [tau1, tau2], [1.0, 2.0], base=torch.zeros(4), options=options)
    assert torch.equal(out, T([4.0, 3.0, 2.0, -3.0]))


def test_sign_consensus_with_negative_and_zero_weights() -> None:
    tau1, tau2, tau3 = T([1.0, -2.0]), T([3.0, 1.0]), T([100.0, 100.0])
    # weighted: [-1, 2] + [6, 2] + [0, 0] = [5, 4] -> [+, +]; w τ agree: entry 0 only τ2 (6), entry 1 τ1 (2) and τ2 (2)
    # entry 0: 6 / 2 = 3; entry 1: (2 + 2) / (-1 + 2) = 4; the zero-weight input has no sign and never counts
    out = merge_tensor(
        "ties", [tau1, tau2, tau3], [-1.0, 2.0, 0.0], base=torch.zeros(2), options={"density": 1.0}
    )
    assert torch.equal(out, T([3.0, 4.0]))


def test_dare_linear_keeps_or_rescales_each_entry() -> None:
    base = torch.full((4000,), 0.5)
    tau = torch.linspace(-1, 1, 4000)
    out = merge_tensor(
        "dare_linear", [base + tau], [1.0], base=base, options={"density": 0.5}, key="w", seed=3
    )
    delta = out - base
    kept = delta != 0
    torch.testing.assert_close(delta[kept], 2 * tau[kept])
    assert 0.45 < kept.float().mean().item() < 0.55
    dense = merge_tensor("dare_linear", [base + tau], [1.0], base=base, options={"density": 1.0})
    assert torch.equal(dense, merge_tensor("task_arithmetic", [base + tau], [1.0], base=base))


def test_breadcrumbs_keeps_the_middle_band() -> None:
    tau = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    out = merge_tensor(
        "breadcrumbs", [tau], [2.0], base=torch.zeros(10), options={"density": 0.5, "gamma": 0.2}
    )
    assert torch.equal(out, 2 * T([0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0]))


@pytest.mark.parametrize(("depth", "scale"), [(0.0, 0.5), (0.5, 0.75), (1.0, 1.0)])
def test_lines_scales_by_depth_with_defaults(depth: float, scale: float) -> None:
    base, tau = T([1.0, 2.0]), T([2.0, -4.0])
    out = merge_tensor("lines", [base + tau], [1.0], base=base, depth=depth)
    assert torch.equal(out, base + scale * tau)


def test_lines_lambda_multiplies_the_depth_scale() -> None:
    base, tau = T([1.0, 2.0]), T([2.0, -4.0])
    opts = {"lambda": 2.0, "lines_alpha": 0.2, "lines_beta": 0.6}
    out = merge_tensor("lines", [base + tau], [1.0], base=base, depth=0.5, options=opts)
    assert torch.equal(out, base + 2.0 * (0.2 + 0.6 * 0.5) * tau)
    plain = merge_tensor(
        "lines", [base + tau], [1.0], base=base, depth=0.3, options={"lines_alpha": 1.0, "lines_beta": 0.0}
    )
    assert torch.equal(plain, merge_tensor("task_arithmetic", [base + tau], [1.0], base=base))


def test_depth_is_ignored_by_methods_without_depth_scaling() -> None:
    base, x = T([1.0]), T([3.0])
    assert torch.equal(
        merge_tensor("task_arithmetic", [x], [1.0], base=base, depth=0.0),
        merge_tensor("task_arithmetic", [x], [1.0], base=base, depth=1.0),
    )


# --- dtypes and devices --------------------------------------------------------------------------


def test_fp16_near_max_accumulates_in_fp32() -> None:
    a, b = T([65504.0, 60000.0], dtype=torch.float16), T([65504.0, 65504.0], dtype=torch.float16)
    out = merge_tensor("linear", [a, b], [0.5, 0.5])
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert torch.equal(out, ((a.float() + b.float()) / 2).half())


def test_fp16_task_arithmetic_does_not_overflow_in_between() -> None:
    base = T([60000.0], dtype=torch.float16)
    x = T([65504.0], dtype=torch.float16)
    out = merge_tensor("task_arithmetic", [x, x], [0.5, 0.5], base=base)
    assert torch.equal(out, x)


def test_bf16_inputs_match_an_fp32_reference() -> None:
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(64, generator=g).to(torch.bfloat16) for _ in range(5)]
    weights = [0.1, 0.2, 0.3, 0.15, 0.25]
    expected = sum(w * t.float() for w, t in zip(weights, inputs))
    out = merge_tensor("linear", inputs, weights)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the float32 sum (the fused float32 multiply-add may round differently)
    torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-6)
    assert merge_tensor("linear", inputs, weights, out_dtype=torch.float32).dtype == torch.float32


def test_many_bf16_inputs_lose_nothing_to_bf16_accumulation() -> None:
    inputs = [torch.full((4,), 1.0, dtype=torch.bfloat16)] + [
        torch.full((4,), 1.0 + 2**-7, dtype=torch.bfloat16)
    ] * 100
    out = merge_tensor("linear", inputs, [1 / 101] * 101, out_dtype=torch.float32)
    torch.testing.assert_close(out, torch.full((4,), 1.0 + 2**-7 * 100 / 101), rtol=1e-6, atol=0.0)


def test_default_out_dtype_is_that_of_input_0() -> None:
    a, b = T([1.0], dtype=torch.float16), T([2.0], dtype=torch.float32)
    assert merge_tensor("linear", [a, b], [0.5, 0.5]).dtype == torch.float16
    assert merge_tensor("linear", [b, a], [0.5, 0.5]).dtype == torch.float32
    base = T([0.0], dtype=torch.bfloat16)
    assert merge_tensor("ties", [a, b], [1.0, 1.0], base=base).dtype == torch.float16


def test_result_is_a_new_tensor_without_grad() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    out = merge_tensor("linear", [p], [1.0])
    assert type(out) is torch.Tensor and not out.requires_grad
    out.add_(1)
    assert torch.equal(p.detach(), torch.ones(3))


# --- non-floating tensors --------------------------------------------------------------------------


def test_identical_int_buffers_are_copied() -> None:
    ids = torch.arange(5)
    out = merge_tensor("linear", [ids, ids.clone()], [0.3, 0.7], out_dtype=torch.float16)
    assert torch.equal(out, ids) and out.dtype == torch.int64 and out.data_ptr() != ids.data_ptr()
    out = merge_tensor("ties", [ids, ids.clone()], [1.0, 1.0], base=ids.clone())
    assert torch.equal(out, ids)
    mask = T([True, False])
    assert torch.equal(merge_tensor("dare_ties", [mask, mask.clone()], [1.0, 1.0], base=mask.clone()), mask)


def test_differing_int_buffers_raise_naming_the_key() -> None:
    with pytest.raises(IncompatibleModelsError) as info:
        merge_tensor("linear", [torch.arange(3), T([0, 1, 5])], [0.5, 0.5], key="embeddings.position_ids")
    assert "'embeddings.position_ids'" in str(info.value) and "input 1" in str(info.value)
    with pytest.raises(IncompatibleModelsError, match="the base"):
        merge_tensor("task_arithmetic", [torch.arange(3)], [1.0], base=T([0, 1, 5]), key="ids")


def test_float_and_int_mix_raises() -> None:
    with pytest.raises(IncompatibleModelsError, match="only floating-point dtypes may differ"):
        merge_tensor("linear", [torch.zeros(3), torch.arange(3)], [0.5, 0.5], key="k")
    with pytest.raises(IncompatibleModelsError, match="only floating-point"):
        merge_tensor("linear", [torch.arange(3), torch.zeros(3)], [0.5, 0.5], key="k")
    with pytest.raises(IncompatibleModelsError, match="the base"):
        merge_tensor("ties", [torch.zeros(3)], [1.0], base=torch.arange(3), key="k")


# --- errors ----------------------------------------------------------------------------------------


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    with pytest.raises(IncompatibleModelsError) as info:
        merge_tensor("linear", [torch.zeros(2, 3), torch.zeros(3, 2)], [0.5, 0.5], key="lm_head.weight")
    message = str(info.value)
    assert "'lm_head.weight'" in message and "(2, 3)" in message and "(3, 2)" in message
    with pytest.raises(IncompatibleModelsError, match=r"\(4,\) in the base"):
        merge_tensor("task_arithmetic", [torch.zeros(3)], [1.0], base=torch.zeros(4), key="b")


def test_nan_input_is_named() -> None:
    bad = T([1.0, float("nan")])
    with pytest.raises(NonFiniteError) as info:
        merge_tensor("linear", [T([1.0, 2.0]), bad], [0.5, 0.5], key="layer.w")
    assert "'layer.w'" in str(info.value) and "input 1" in str(info.value)
    assert "input 0" not in str(info.value)


@pytest.mark.parametrize("method", TASK_METHODS)
def test_non_finite_input_or_base_is_named_for_every_task_method(method: str) -> None:
    good = torch.ones(8)
    bad = good.clone()
    bad[3] = float("inf")
    inputs, weights = fit(method, [good, bad], [1.0, 1.0])
    if len(inputs) == 1:  # SLERP merges one model with the base: the bad one is input 0
        inputs = [bad]
    with pytest.raises(NonFiniteError, match=f"input {len(inputs) - 1}"):
        merge_tensor(method, inputs, weights, base=torch.zeros(8), key="w")
    with pytest.raises(NonFiniteError, match="the base"):
        merge_tensor(method, [good] * len(inputs), weights, base=bad, key="w")


def test_overflow_from_finite_inputs_is_explained() -> None:
    x = T([60000.0], dtype=torch.float16)
    with pytest.raises(NonFiniteError, match="overflows"):
        merge_tensor(
            "task_arithmetic",
            [x],
            [1.0],
            base=torch.zeros(1, dtype=torch.float16),
            options={"lambda": 4.0},
            key="w",
        )
    assert (
        merge_tensor(
            "task_arithmetic",
            [x],
            [1.0],
            base=torch.zeros(1, dtype=torch.float16),
            options={"lambda": 4.0},
            out_dtype=torch.float32,
        ).item()
        == 240000.0
    )


def test_argument_errors() -> None:
    x = torch.zeros(2)
    with pytest.raises(UsageError, match="unknown"):
        merge_tensor("average", [x], [1.0])
    with pytest.raises(UsageError, match="takes no base"):
        merge_tensor("linear", [x], [1.0], base=x)
    with pytest.raises(UsageError, match="needs a base"):
        merge_tensor("ties", [x], [1.0])
    with pytest.raises(UsageError, match="one weight per input"):
        merge_tensor("linear", [x, x], [1.0])
    with pytest.raises(UsageError, match="at least one"):
        merge_tensor("linear", [], [])
    with pytest.raises(UsageError, match="weight 0"):
        merge_tensor("linear", [x], [float("nan")])
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        merge_tensor("ties", [x], [1.0], base=x, options={"density": 0.0})
    with pytest.raises(UsageError, match="valid options"):
        merge_tensor("ties", [x], [1.0], base=x, options={"k": 0.2})
    with pytest.raises(UsageError, match="out_dtype"):
        merge_tensor("linear", [x], [1.0], out_dtype=torch.int64)
    with pytest.raises(UsageError, match=r"torch\.Tensor"):
        merge_tensor("linear", [lambda: [1.0, 2.0]], [1.0])  # type: ignore[list-item, return-value]


def test_options_may_be_pre_resolved_or_a_method_row() -> None:
    x, base = T([1.0, -3.0]), torch.zeros(2)
    resolved = resolve_options("ties", {"density": 0.5})
    assert torch.equal(merge_tensor(METHODS["ties"], [x], [1.0], base=base, options=resolved), T([0.0, -3.0]))


# --- inputs are never mutated ------------------------------------------------------------------


@pytest.mark.parametrize("method", method_names())
def test_inputs_and_base_are_not_mutated(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(6, 5, generator=g) for _ in range(3)]  # float32: .float() would alias them
    base = torch.randn(6, 5, generator=g)
    before = [t.clone() for t in inputs]
    base_before = base.clone()
    inputs, weights = fit(method, inputs, [0.2, 0.3, 0.5])
    kwargs = {"base": base} if METHODS[method].needs_base else {}
    out = merge_tensor(method, inputs, weights, key="w", **kwargs)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b)
    assert torch.equal(base, base_before)
    assert all(out.data_ptr() != t.data_ptr() for t in [*inputs, base])


def test_an_owned_first_input_is_accumulated_in_place_and_a_plain_thunk_is_not() -> None:
    """OwnedLoader marks a loader whose tensors nobody else holds: the linear sum reuses input 0's memory (one copy
    fewer) with the same bits; a plain thunk that hands out a kept tensor is left untouched."""
    g = torch.Generator().manual_seed(2)
    kept = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    expected = merge_tensor("linear", kept, weights)
    fresh: list[torch.Tensor] = []

    def load_fresh() -> torch.Tensor:
        fresh.append(kept[0].clone())
        return fresh[-1]

    owned = merge_tensor("linear", [OwnedLoader(load_fresh), kept[1], kept[2]], weights)
    assert torch.equal(owned, expected)
    assert owned.data_ptr() == fresh[0].data_ptr()  # computed in the loaded tensor's memory
    before = kept[0].clone()
    plain = merge_tensor("linear", [lambda: kept[0], kept[1], kept[2]], weights)
    assert torch.equal(plain, expected) and torch.equal(kept[0], before)
    assert plain.data_ptr() != kept[0].data_ptr()
    half = kept[0].half()  # not float32: copied into a float32 accumulator, owned or not
    mixed = merge_tensor(
        "linear", [OwnedLoader(lambda: half), kept[1], kept[2]], weights, out_dtype=torch.float32
    )
    assert torch.equal(half, kept[0].half()) and mixed.dtype == torch.float32


@pytest.mark.parametrize("method", method_names())
def test_non_contiguous_inputs_give_contiguous_results(method: str) -> None:
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(5, 7, generator=g).t() for _ in range(2)]  # (7, 5) views, not contiguous
    base = torch.randn(5, 7, generator=g).t()
    inputs, weights = fit(method, inputs, [0.5, 0.5])
    kwargs = {"base": base} if METHODS[method].needs_base else {}
    out = merge_tensor(method, inputs, weights, key="w", **kwargs)
    expected = merge_tensor(
        method,
        [t.contiguous() for t in inputs],
        weights,
        key="w",
        **{k: v.contiguous() for k, v in kwargs.items()},
    )
    assert out.is_contiguous() and torch.equal(out, expected)
    ids = torch.arange(6).reshape(2, 3).t()
    assert merge_tensor("linear", [ids, ids], [0.5, 0.5]).is_contiguous()


# --- laziness -----------------------------------------------------------------------------------


class _Loader:
    """Thunks that build a fresh tensor per call and count how many are alive at once."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors, self.live, self.peak, self.calls = tensors, 0, 0, 0

    def thunk(self, i: int) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            self.calls += 1
            self.live += 1
            self.peak = max(self.peak, self.live)
            tensor = self.tensors[i].clone()
            weakref.finalize(tensor, self._release)
            return tensor

        return load

    def _release(self) -> None:
        self.live -= 1


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear", "breadcrumbs", "lines"])
def test_thunks_are_loaded_one_at_a_time(method: str) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(32, generator=g) for _ in range(4)]
    loader = _Loader(tensors)
    weights = [0.25] * 4
    base = torch.randn(32, generator=g) if METHODS[method].needs_base else None
    lazy = merge_tensor(method, [loader.thunk(i) for i in range(4)], weights, base=base, key="w", seed=1)
    eager = merge_tensor(method, tensors, weights, base=base, key="w", seed=1)
    assert torch.equal(lazy, eager)
    assert loader.calls == 4
    assert loader.peak == 1
    assert loader.live == 0


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_consensus_methods_call_each_thunk_once(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(32, generator=g) for _ in range(3)]
    loader = _Loader(tensors)
    base = torch.randn(32, generator=g)
    lazy = merge_tensor(method, [loader.thunk(i) for i in range(3)], [1.0, 0.5, 2.0], base=base, key="w")
    assert torch.equal(lazy, merge_tensor(method, tensors, [1.0, 0.5, 2.0], base=base, key="w"))
    assert loader.calls == 3 and loader.live == 0


def test_base_may_be_a_thunk() -> None:
    base = T([1.0, 1.0])
    out = merge_tensor("task_arithmetic", [T([3.0, 0.0])], [1.0], base=lambda: base.clone())
    assert torch.equal(out, T([3.0, 0.0]))
