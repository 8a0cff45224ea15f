"""Merge one tensor (the same key from every model) with any registered method.

Semantics (θᵢ = input i, wᵢ = its weight, θ_b = base; all arithmetic in float32):

- ``linear``: ``Σᵢ wᵢ θᵢ``. Takes no base.
- task-vector methods ("generalized task arithmetic"): ``τᵢ = θᵢ − θ_b``, ``τᵢ' = sparsify(τᵢ)``
  (per tensor, see :mod:`resilient_tune.merging._sparsify`), then

  - without consensus: ``merged = Σᵢ wᵢ τᵢ'``;
  - with ``consensus="sign"`` (TIES): elect per entry the sign of the weighted mass ``Σᵢ wᵢ τᵢ'``
    (``>= 0`` elects +), keep the entries of each input whose weighted value ``wᵢ τᵢ'`` has the
    elected sign (zeros never agree), and ``merged = Σ_agree wᵢ τᵢ' / Σ_agree wᵢ`` (a divisor of 0
    becomes 1). This is mergekit's normalisation (sum of the agreeing weights) applied to every
    consensus method (mergekit's own ``dare_ties``/``breadcrumbs_ties`` default to no division);
    peft divides by the *count* of agreeing inputs and elects the sign on unweighted deltas, which
    is the same when every weight is 1.

  and ``result = θ_b + lambda · s · merged`` with ``s = lines_alpha + lines_beta · depth`` for
  depth-scaled methods (LiNeS) and ``s = 1`` otherwise.

Memory: ``linear`` and the methods without consensus load their inputs one at a time (a thunk is
called only when its turn comes, and the tensor is dropped before the next one is loaded): peak
memory is the float32 accumulator, a float32 scratch delta (and a float32 workspace for
sparsifiers), the base and one input. Sign consensus needs every sparsified task vector at once
(N float32 copies of this one tensor). Full-size temporaries are allocated once per call and
reused, and no bool tensors are built on the hot paths (they are slow on CPU). Results are
contiguous.

Non-floating tensors (integer ids, bool masks) are never averaged: they are returned as a copy when
identical in every input (and the base), else :class:`IncompatibleModelsError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

from resilient_tune.errors import IncompatibleModelsError, NonFiniteError, UsageError
from resilient_tune.merging._combine import check_inputs, model_stock, slerp
from resilient_tune.merging._registry import MergeMethod, as_method, resolve_options
from resilient_tune.merging._sparsify import sparsify_, tensor_generator
from resilient_tune.merging._validate import as_floats

__all__ = ["OwnedLoader", "TensorSource", "merge_tensor", "raise_if_non_finite"]

TensorSource = Union[torch.Tensor, Callable[[], torch.Tensor]]  # noqa: UP007 (a runtime alias)
"""A tensor, or a zero-argument callable (thunk) that loads it when called."""


class OwnedLoader:
    """A thunk whose every call returns a new tensor that nothing else holds (e.g. read from a file).

    :func:`merge_tensor` may then compute in that tensor's memory instead of copying it first: a linear merge
    scales the first input in place and accumulates into it. Wrap only loaders that never return a tensor
    someone else keeps (not ``lambda: state[key]``); plain thunks are never written to.
    """

    __slots__ = ("_load",)

    def __init__(self, load: Callable[[], torch.Tensor]) -> None:
        self._load = load

    def __call__(self) -> torch.Tensor:
        return self._load()


@torch.no_grad()
def merge_tensor(
    method: MergeMethod | str,
    inputs: Sequence[TensorSource],
    weights: Sequence[float],
    *,
    base: TensorSource | None = None,
    options: Mapping[str, float] | None = None,
    key: str = "",
    depth: float = 0.0,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Merge the same tensor from several models.

    Args:
        method: a :class:`MergeMethod` or a registered name.
        inputs: one tensor (or thunk) per model, all of the same shape.
        weights: one weight per input (mixing proportions for ``linear``, task scales otherwise);
            used as given (see :func:`validate_weights` for the sum rules).
        base: the base tensor (or thunk); required by task-vector methods, refused by ``linear``.
        options: method options, resolved or not (see :func:`resolve_options`).
        key: the tensor's name, used in messages and to seed DARE masks.
        depth: LiNeS depth in ``[0, 1]`` (see :func:`layer_depths`); used by depth-scaled methods.
        seed: merge seed; DARE masks depend only on ``(seed, key, input index)``.
        out_dtype: dtype of the result (default: the dtype of ``inputs[0]``); ignored for
            non-floating tensors.
        check_finite: check the result for NaN/Inf (one reduction over it). A caller that checks later, e.g.
            on another thread with :func:`raise_if_non_finite`, may pass ``False``; sparsified task vectors are
            checked regardless, since trimming could hide a NaN.
        names: a label per input, then one for the base, used in NaN/Inf messages (default ``input i`` and
            ``the base``).

    Returns:
        A new tensor of the inputs' shape, on the device of ``inputs[0]``. Inputs are never mutated.

    Raises:
        UsageError: bad arguments (counts, base use, options, out_dtype).
        IncompatibleModelsError: shape or dtype-kind mismatch, or differing non-floating tensors.
        NonFiniteError: the result holds NaN/Inf; the message names the inputs holding NaN/Inf.
    """
    spec = as_method(method)
    opts = resolve_options(spec, options)
    w = _check_call(spec, inputs, weights, base, depth, out_dtype, key)
    stream = _Inputs(inputs, base, key, names)
    if not stream.is_float:
        return _copy_identical(stream, base, key)
    dtype = out_dtype or stream.dtype
    if spec.combine != "sum":
        base32 = _load_base(base, stream, key)
        combine = slerp if spec.combine == "slerp" else model_stock
        merged = combine(stream.load, len(stream), stream.shape, base32, opts)
        del base32
    elif spec.needs_base:
        base32 = _load_base(base, stream, key)
        merged = _task_vectors(spec, stream, w, base32, opts, seed)
        scale = opts["lambda"]
        if spec.depth_scaling:
            scale *= opts["lines_alpha"] + opts["lines_beta"] * depth
        torch.add(base32, merged, alpha=scale, out=merged)  # base + scale · merged, in place
        del base32
    else:
        merged = _weighted_sum(stream, w)
    result = merged.to(dtype)
    del merged
    if check_finite:
        raise_if_non_finite(result, key=key, inputs=inputs, base=base, names=names)
    return result


def raise_if_non_finite(
    result: torch.Tensor,
    *,
    key: str,
    inputs: Sequence[TensorSource],
    base: TensorSource | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Raise :class:`NonFiniteError` when a merged tensor holds NaN/Inf, naming the inputs that do.

    Non-floating tensors always pass. The thunks in ``inputs``/``base`` are called again only on failure.
    ``names`` labels the inputs, then the base, in the message (default ``input i`` and ``the base``).
    """
    if result.is_floating_point() and not _all_finite(result):
        raise _non_finite(key, inputs, base, result.dtype, names=names)


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN/Inf: one reduction, no allocation (exact check only if the sum overflows)."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_call(
    spec: MergeMethod,
    inputs: Sequence[TensorSource],
    weights: Sequence[float],
    base: TensorSource | None,
    depth: float,
    out_dtype: torch.dtype | None,
    key: str,
) -> list[float]:
    if len(inputs) == 0:
        raise UsageError(f"no inputs to merge for tensor {key!r}; pass at least one tensor")
    w = as_floats(weights)
    if len(w) != len(inputs):
        raise UsageError(
            f"got {len(w)} weights for {len(inputs)} inputs of tensor {key!r}; pass one weight per input"
        )
    check_inputs(spec, len(inputs), w, key=key)
    if spec.needs_base and base is None:
        raise UsageError(f"merge method {spec.name!r} needs a base model; pass base=")
    if not spec.needs_base and base is not None:
        raise UsageError(
            f"merge method {spec.name!r} takes no base; drop base= or use a task-vector method such as 'task_arithmetic'"
        )
    if not math.isfinite(depth):
        raise UsageError(f"depth={depth} for tensor {key!r} must be a finite number in [0, 1]")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise UsageError(f"out_dtype={out_dtype!r} must be a floating torch.dtype such as torch.float16")
    return w


def _load(source: TensorSource, key: str, what: str) -> torch.Tensor:
    tensor = source if isinstance(source, torch.Tensor) else source()
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(
            f"the loader of {what} for tensor {key!r} returned {type(tensor).__name__}, not a torch.Tensor"
        )
    return tensor


class _Inputs:
    """Loads the inputs one at a time and checks each against input 0 (loaded eagerly to learn the shape)."""

    def __init__(
        self,
        sources: Sequence[TensorSource],
        base: TensorSource | None,
        key: str,
        names: Sequence[str] | None,
    ) -> None:
        self.sources, self.base, self.key, self.names = sources, base, key, names
        self._first: torch.Tensor | None = _load(sources[0], key, "input 0")
        self.first_owned = isinstance(sources[0], OwnedLoader)  # input 0's memory may be reused
        self.shape, self.dtype, self.device = self._first.shape, self._first.dtype, self._first.device
        self.is_float = self._first.is_floating_point()

    def __len__(self) -> int:
        return len(self.sources)

    def load(self, i: int) -> torch.Tensor:
        """Return input ``i`` on the device of input 0; the caller should drop it before loading the next."""
        if i == 0 and self._first is not None:
            tensor, self._first = self._first, None
            return tensor
        return self.check(_load(self.sources[i], self.key, f"input {i}"), f"input {i}").to(self.device)

    def check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tensor.shape != self.shape:
            raise IncompatibleModelsError(
                f"tensor {self.key!r} has shape {tuple(self.shape)} in input 0 but {tuple(tensor.shape)} in {what}; "
                "merge models of the same architecture and size"
            )
        same_kind = tensor.is_floating_point() if self.is_float else tensor.dtype == self.dtype
        if not same_kind:
            raise IncompatibleModelsError(
                f"tensor {self.key!r} is {self.dtype} in input 0 but {tensor.dtype} in {what}; "
                "only floating-point dtypes may differ between models"
            )
        return tensor


def _load_base(base: TensorSource | None, stream: _Inputs, key: str) -> torch.Tensor:
    assert base is not None  # checked by _check_call
    tensor = stream.check(_load(base, key, "the base"), "the base")
    return tensor.to(device=stream.device, dtype=torch.float32)  # may be the caller's tensor: read only


def _weighted_sum(stream: _Inputs, weights: list[float]) -> torch.Tensor:
    acc: torch.Tensor | None = None
    for i, w in enumerate(weights):
        tensor = stream.load(i)
        if acc is None and stream.first_owned and tensor.dtype == torch.float32 and tensor.is_contiguous():
            acc = tensor.mul_(w) if w != 1.0 else tensor  # a fresh tensor of our own: no copy
        elif acc is None:
            acc = _scaled_float32_copy(tensor, w)
        else:
            acc.add_(tensor, alpha=w)  # promotes a half-precision input to float32 element by element
        del tensor
    assert acc is not None
    return acc


def _scaled_float32_copy(tensor: torch.Tensor, w: float) -> torch.Tensor:
    if tensor.dtype == torch.float32 and tensor.is_contiguous() and w != 1.0:
        return torch.mul(tensor, w)  # a new contiguous tensor in one pass
    copy = tensor.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    return copy.mul_(w) if w != 1.0 else copy


def _task_vectors(
    spec: MergeMethod,
    stream: _Inputs,
    weights: list[float],
    base32: torch.Tensor,
    opts: dict[str, float],
    seed: int,
) -> torch.Tensor:
    """Σ wᵢ τᵢ' (no consensus: one input and one scratch delta at a time) or the sign-consensus mean."""
    workspace = _empty(stream) if spec.sparsify is not None else None
    if spec.consensus is None:
        acc, scratch = _empty(stream), None
        for i, w in enumerate(weights):
            if i > 0 and scratch is None:
                scratch = _empty(stream)
            delta = _delta(
                spec, stream, i, base32, opts, seed, out=acc if i == 0 else scratch, workspace=workspace
            )
            if i == 0:
                acc.mul_(w)
            else:
                acc.add_(delta, alpha=w)
            del delta
        return acc
    deltas: list[torch.Tensor | None] = []
    total: torch.Tensor | None = None
    for i, w in enumerate(weights):
        delta = _delta(spec, stream, i, base32, opts, seed, out=None, workspace=workspace)
        if total is None:
            total = torch.mul(delta, w)
        else:
            total.add_(delta, alpha=w)
        deltas.append(delta)
        del delta
    assert total is not None
    return _sign_consensus(total, deltas, weights, workspace)


def _empty(stream: _Inputs) -> torch.Tensor:
    return torch.empty(stream.shape, dtype=torch.float32, device=stream.device)


def _delta(
    spec: MergeMethod,
    stream: _Inputs,
    i: int,
    base32: torch.Tensor,
    opts: dict[str, float],
    seed: int,
    *,
    out: torch.Tensor | None,
    workspace: torch.Tensor | None,
) -> torch.Tensor:
    """The sparsified task vector τᵢ' of input ``i`` in float32 (written into ``out`` when given)."""
    tensor = stream.load(i)
    delta = torch.sub(tensor, base32, out=out if out is not None else _empty(stream))  # contiguous float32
    del tensor
    if spec.sparsify is not None:
        if not _all_finite(delta):  # sparsifiers could drop a NaN silently: check before
            raise _non_finite(
                stream.key,
                stream.sources,
                stream.base,
                torch.float32,
                before_sparsify=True,
                names=stream.names,
            )
        random = spec.sparsify in ("random", "magnitude_rank")
        generator = tensor_generator(seed, stream.key, i) if random else None
        sparsify_(spec.sparsify, delta, opts, generator, workspace)
    return delta


def _sign_consensus(
    total: torch.Tensor,
    deltas: list[torch.Tensor | None],
    weights: list[float],
    workspace: torch.Tensor | None,
) -> torch.Tensor:
    """TIES elect + disjoint mean, in float arithmetic (no bool tensors: they are slow on CPU).

    Consumes ``total`` (Σ wᵢτᵢ', becomes the result) and the ``deltas`` (freed one by one).
    """
    elected = torch.sign(total, out=workspace) if workspace is not None else torch.sign(total)
    elected.add_(0.5).sign_()  # +1 where Σ wᵢτᵢ' >= 0, else -1
    numerator = total.zero_()
    divisor = torch.zeros_like(numerator)
    agree = torch.empty_like(numerator)
    for i, w in enumerate(weights):
        delta, deltas[i] = deltas[i], None
        assert delta is not None
        if w == 0.0:
            continue  # w·τ = 0 has no sign: never agrees
        torch.sign(delta, out=agree).mul_(elected)  # +1 where τ has the elected sign, -1 opposite, 0 if τ = 0
        if w < 0:
            agree.neg_()  # the sign of w·τ is what must agree
        agree.clamp_(min=0.0)
        numerator.addcmul_(delta, agree, value=w)
        divisor.add_(agree, alpha=w)
        del delta
    torch.sign(divisor, out=agree).abs_().neg_().add_(1.0)  # 1 exactly where the divisor is 0
    return numerator.div_(divisor.add_(agree))


def _copy_identical(stream: _Inputs, base: TensorSource | None, key: str) -> torch.Tensor:
    ref = stream.load(0)
    others = [(f"input {i}", (lambda i=i: stream.load(i))) for i in range(1, len(stream))]
    if base is not None:
        others.append(("the base", lambda: stream.check(_load(base, key, "the base"), "the base")))
    for what, load in others:
        if not torch.equal(ref, load().to(ref.device)):
            raise IncompatibleModelsError(
                f"non-floating tensor {key!r} ({ref.dtype}) differs between input 0 and {what}; such tensors "
                "are copied, not averaged, so they must be identical: merge checkpoints of the same architecture"
            )
    return ref.clone(memory_format=torch.contiguous_format)


def _non_finite(
    key: str,
    inputs: Sequence[TensorSource],
    base: TensorSource | None,
    dtype: torch.dtype,
    *,
    before_sparsify: bool = False,
    names: Sequence[str] | None = None,
) -> NonFiniteError:
    """Build the error, reloading the sources (thunks are called again) to say which hold NaN/Inf."""
    labels = [*(names or ())]
    labels += [f"input {i}" for i in range(len(labels), len(inputs))] + ["the base"]
    sources = [(labels[i], src) for i, src in enumerate(inputs)]
    if base is not None:
        sources.append((labels[len(inputs)], base))
    culprits = [what for what, src in sources if not bool(torch.isfinite(_load(src, key, what)).all())]
    if culprits:
        return NonFiniteError(
            f"tensor {key!r}: {', '.join(culprits)} hold(s) NaN or Inf; repair or drop that checkpoint"
        )
    where = "a task vector" if before_sparsify else f"the merged result ({dtype})"
    return NonFiniteError(
        f"tensor {key!r}: {where} overflows to NaN/Inf although every input is finite; "
        "use smaller weights or lambda, or a float32 output (out_dtype=torch.float32; merge(dtype='float32'); "
        "--dtype float32)"
    )
