"""The registry of merge methods: each method is one data row, not a function.

Every task-vector method is the same "generalized task arithmetic" (mergekit's term) built from two
choices, a *sparsifier* applied to each task vector and an optional *consensus* step:

=================  ==============  =========  =====  ===========================================
name               sparsify        consensus  depth  options (default)
=================  ==============  =========  =====  ===========================================
linear             -               -          -      (none: a weighted average of the models)
task_arithmetic    -               -          -      lambda (1.0)
ties               magnitude       sign       -      lambda (1.0), density (0.5)
dare_linear        random          -          -      lambda (1.0), density (0.5)
dare_ties          random          sign       -      lambda (1.0), density (0.5)
breadcrumbs        outliers        -          -      lambda (1.0), density (0.9), gamma (0.01)
breadcrumbs_ties   outliers        sign       -      lambda (1.0), density (0.9), gamma (0.01)
lines              -               -          yes    lambda (1.0), lines_alpha (0.5), lines_beta (0.5)
della              magnitude_rank  sign       -      lambda (1.0), density (0.5), epsilon (0.15)
della_linear       magnitude_rank  -          -      lambda (1.0), density (0.5), epsilon (0.15)
=================  ==============  =========  =====  ===========================================

Two methods combine the models another way than a weighted sum of task vectors (``combine``):

- ``slerp`` (``t`` 0.5): spherical interpolation between the base and exactly one other model, per tensor (the
  tensor flattened to one vector), ``t = 0`` the base and ``t = 1`` the model; vectors within about 1.8° of
  parallel or antiparallel (``|cos| > 0.9995``, a zero task vector included) fall back to linear interpolation, and a
  zero vector counts as orthogonal to the other (mergekit's rules).
  With ``t = α`` it is the spherical counterpart of ``θ₀ + α(θ − θ₀)``.
- ``model_stock`` (no options): from two or more fine-tuned models of one base, per tensor, the mean pairwise cosine
  ``c`` of their task vectors gives ``t = N·c / (1 + (N − 1)·c)`` and the result ``t·mean(θᵢ) + (1 − t)·base``: a
  data-free interpolation ratio (``t = 0`` where ``1 + (N − 1)·c`` is about 0). The weights are not used.

Options (all floats):

- ``lambda``: scale of the merged task vector, ``result = base + lambda * scale(depth) * merged``.
  Any finite value.
- ``density``: fraction of the entries of each task vector that are kept, in ``(0, 1]``; 1 keeps
  everything (no sparsification).
- ``gamma`` (breadcrumbs): fraction of the largest-magnitude entries dropped as outliers, in
  ``[0, 1)``, with ``density + gamma <= 1``.
- ``epsilon`` (DELLA): spread of the keep probabilities around ``density``: ``density ± epsilon``, in ``[0, 1)``
  with ``0 < density - epsilon`` and ``density + epsilon < 1`` when ``density < 1``.
- ``t`` (SLERP): the interpolation parameter in ``[0, 1]``.
- ``lines_alpha``, ``lines_beta`` (LiNeS): the per-tensor scale is ``lines_alpha + lines_beta *
  depth`` with ``depth`` in ``[0, 1]`` from :func:`~resilient_tune.merging.layer_depths`. The
  defaults 0.5/0.5 are our choice, not a value prescribed by the paper (which tunes both per
  setting): the first layer keeps half of its update, the last layer all of it. ``lambda``
  multiplies this scale, so ``lines`` with ``lines_alpha=1, lines_beta=0`` is ``task_arithmetic``.

Densities, gammas and the trimming rules are documented in :mod:`resilient_tune.merging._sparsify`;
the sign consensus in :mod:`resilient_tune.merging._merge`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from resilient_tune.errors import UsageError

__all__ = ["METHODS", "MergeMethod", "get_method", "method_names", "resolve_options"]

_SPARSIFIERS = (None, "magnitude", "random", "outliers", "magnitude_rank")
_CONSENSUS = (None, "sign")
_COMBINE = ("sum", "slerp", "model_stock")


@dataclass(frozen=True)
class MergeMethod:
    """One registered merge method, described by data.

    Attributes:
        name: registry key, e.g. ``"ties"``.
        needs_base: whether the method works on task vectors ``θᵢ − θ_base`` (every method but
            ``linear``).
        sparsify: ``None``, ``"magnitude"`` (TIES trim), ``"random"`` (DARE drop-and-rescale) or
            ``"outliers"`` (breadcrumbs), applied to every task vector, tensor by tensor.
        consensus: ``None`` or ``"sign"`` (TIES sign election and disjoint mean).
        depth_scaling: whether the merged task vector is scaled by layer depth (LiNeS).
        combine: ``"sum"`` (the weighted sum of task vectors, or of models for ``linear``), ``"slerp"`` or
            ``"model_stock"`` (see the module docs).
        inputs: ``(fewest, most)`` models merged (base excluded); ``None`` for no limit.
        defaults: default value of every option the method accepts (the keys are the valid
            option names).
        paper: arXiv link of the paper that introduced the method.
        description: one line for listings and ``--help``.
    """

    name: str
    needs_base: bool
    sparsify: str | None
    consensus: str | None
    depth_scaling: bool
    defaults: Mapping[str, float] = field(hash=False)
    paper: str
    description: str
    combine: str = "sum"
    inputs: tuple[int, int | None] = (1, None)

    def __post_init__(self) -> None:
        if self.combine not in _COMBINE:
            raise UsageError(f"combine={self.combine!r} is unknown; use one of {_COMBINE}")
        if self.sparsify not in _SPARSIFIERS:
            raise UsageError(f"sparsify={self.sparsify!r} is unknown; use one of {_SPARSIFIERS}")
        if self.consensus not in _CONSENSUS:
            raise UsageError(f"consensus={self.consensus!r} is unknown; use one of {_CONSENSUS}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


def _row(
    name: str,
    sparsify: str | None,
    consensus: str | None,
    paper: str,
    description: str,
    *,
    combine: str = "sum",
    inputs: tuple[int, int | None] = (1, None),
    **defaults: float,
) -> MergeMethod:
    return MergeMethod(
        name=name,
        needs_base=name != "linear",
        sparsify=sparsify,
        consensus=consensus,
        depth_scaling=name == "lines",
        defaults=defaults,
        paper=paper,
        description=description,
        combine=combine,
        inputs=inputs,
    )


_ROWS = (
    _row(
        "linear",
        None,
        None,
        "https://arxiv.org/abs/2203.05482 (model soups); https://arxiv.org/abs/2311.13534 (LM-Cocktail)",
        "weighted average of the models: sum_i w_i * theta_i (weights sum to 1)",
    ),
    _row(
        "task_arithmetic",
        None,
        None,
        "https://arxiv.org/abs/2212.04089",
        "base + lambda * sum_i w_i * (theta_i - base)",
        **{"lambda": 1.0},
    ),
    _row(
        "ties",
        "magnitude",
        "sign",
        "https://arxiv.org/abs/2306.01708",
        "TIES: trim task vectors to the top-density magnitudes, elect signs, average the agreeing entries",
        **{"lambda": 1.0, "density": 0.5},
    ),
    _row(
        "dare_linear",
        "random",
        None,
        "https://arxiv.org/abs/2311.03099",
        "DARE: drop task-vector entries at random (keep probability density, rescale 1/density), then sum",
        **{"lambda": 1.0, "density": 0.5},
    ),
    _row(
        "dare_ties",
        "random",
        "sign",
        "https://arxiv.org/abs/2311.03099",
        "DARE drop-and-rescale, then TIES sign election and disjoint mean",
        **{"lambda": 1.0, "density": 0.5},
    ),
    _row(
        "breadcrumbs",
        "outliers",
        None,
        "https://arxiv.org/abs/2312.06795",
        "Model Breadcrumbs: drop the top-gamma outliers and the smallest entries, keep density, then sum",
        **{"lambda": 1.0, "density": 0.9, "gamma": 0.01},
    ),
    _row(
        "breadcrumbs_ties",
        "outliers",
        "sign",
        "https://arxiv.org/abs/2312.06795",
        "Model Breadcrumbs sparsification, then TIES sign election and disjoint mean",
        **{"lambda": 1.0, "density": 0.9, "gamma": 0.01},
    ),
    _row(
        "lines",
        None,
        None,
        "https://arxiv.org/abs/2410.17146",
        "LiNeS: task arithmetic scaled per layer by lines_alpha + lines_beta * depth (shallow layers stay near base)",
        **{"lambda": 1.0, "lines_alpha": 0.5, "lines_beta": 0.5},
    ),
    _row(
        "della",
        "magnitude_rank",
        "sign",
        "https://arxiv.org/abs/2406.11617",
        "DELLA: drop task-vector entries with magnitude-ranked probabilities (density +/- epsilon), rescale, TIES signs",
        **{"lambda": 1.0, "density": 0.5, "epsilon": 0.15},
    ),
    _row(
        "della_linear",
        "magnitude_rank",
        None,
        "https://arxiv.org/abs/2406.11617",
        "DELLA's magnitude-ranked drop and rescale, then a weighted sum of the task vectors",
        **{"lambda": 1.0, "density": 0.5, "epsilon": 0.15},
    ),
    _row(
        "slerp",
        None,
        None,
        "https://arxiv.org/abs/2403.13257 (MergeKit, which popularised it for LLMs; SLERP: Shoemake 1985)",
        "spherical interpolation between the base (t=0) and one model (t=1), per tensor",
        combine="slerp",
        inputs=(1, 1),
        t=0.5,
    ),
    _row(
        "model_stock",
        None,
        None,
        "https://arxiv.org/abs/2403.19522",
        "Model Stock: per tensor, t from the angle between 2+ fine-tuned models' task vectors; t*mean + (1-t)*base",
        combine="model_stock",
        inputs=(2, None),
    ),
)

METHODS: Mapping[str, MergeMethod] = MappingProxyType({row.name: row for row in _ROWS})
"""Read-only mapping from method name to :class:`MergeMethod`, in registration order."""


def method_names() -> list[str]:
    """Names of the registered methods, in registration order (``linear`` first)."""
    return list(METHODS)


def get_method(name: str) -> MergeMethod:
    """Look up a registered method by name.

    Raises:
        UsageError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UsageError(f"merge method {name!r} is unknown; use one of: {', '.join(METHODS)}") from None


def as_method(method: MergeMethod | str) -> MergeMethod:
    """Return ``method`` itself or the registered row it names."""
    if isinstance(method, MergeMethod):
        return method
    return get_method(method)


def resolve_options(method: MergeMethod | str, options: Mapping[str, float] | None) -> dict[str, float]:
    """The method's default options overlaid by ``options``, validated.

    Calling it on an already resolved dict returns an equal dict (it is idempotent and cheap).

    Args:
        method: a :class:`MergeMethod` or a registered name.
        options: option name -> value; ``None`` means all defaults.

    Returns:
        A new dict holding every option the method accepts, as floats.

    Raises:
        UsageError: unknown method or option name (the message lists the valid ones), a value that is
            not a real number, or a value out of range: ``density`` in ``(0, 1]``, ``gamma`` in
            ``[0, 1)`` with ``density + gamma <= 1``, ``lambda``/``lines_alpha``/``lines_beta``
            finite.
    """
    spec = as_method(method)
    resolved = dict(spec.defaults)
    for name, value in (options or {}).items():
        if name not in spec.defaults:
            valid = ", ".join(spec.defaults) or "none (it takes no options)"
            raise UsageError(
                f"option {name!r} is not valid for merge method {spec.name!r}; valid options: {valid}"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UsageError(f"option {name}={value!r} for merge method {spec.name!r} must be a real number")
        resolved[name] = float(value)
    _check_ranges(spec.name, resolved)
    return resolved


def _check_ranges(method: str, opts: Mapping[str, float]) -> None:
    for name in ("lambda", "lines_alpha", "lines_beta", "density", "gamma", "epsilon", "t"):
        if name in opts and not math.isfinite(opts[name]):
            raise UsageError(
                f"option {name}={opts[name]} for merge method {method!r} must be a finite number"
            )
    density = opts.get("density")
    if density is not None and not 0.0 < density <= 1.0:
        raise UsageError(
            f"density={density} for merge method {method!r} is out of range; pass a value in (0, 1] "
            "(the fraction of each task vector that is kept)"
        )
    t = opts.get("t")
    if t is not None and not 0.0 <= t <= 1.0:
        raise UsageError(
            f"t={t} for merge method {method!r} is out of range; pass a value in [0, 1] (0 = the base, 1 = the model)"
        )
    epsilon = opts.get("epsilon")
    if epsilon is not None and density is not None:
        if not 0.0 <= epsilon < 1.0:
            raise UsageError(
                f"epsilon={epsilon} for merge method {method!r} is out of range; pass a value in [0, 1)"
            )
        if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
            raise UsageError(
                f"epsilon={epsilon} with density={density} for merge method {method!r} puts a keep probability "
                f"outside (0, 1): pass epsilon < min(density, 1 - density) = {min(density, 1.0 - density):g}"
            )
    gamma = opts.get("gamma")
    if gamma is not None:
        if not 0.0 <= gamma < 1.0:
            raise UsageError(
                f"gamma={gamma} for merge method {method!r} is out of range; pass a value in [0, 1) "
                "(the fraction of largest entries dropped as outliers)"
            )
        if density is not None and density + gamma > 1.0 + 1e-9:
            raise UsageError(
                f"density={density} + gamma={gamma} = {density + gamma} for merge method {method!r} "
                "exceeds 1; lower density or gamma so that density + gamma <= 1"
            )
