"""The recipe: how a merged checkpoint was (or will be) made, serialisable to JSON.

Every folder resilient-tune writes carries its recipe in ``cocktail.json`` so that a checkpoint says exactly how
it was made: the method, the weights, the options, the output dtype and the ingredients it came from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .validation import as_floats

__all__ = ["COCKTAIL_FILE", "DTYPES", "Recipe"]

COCKTAIL_FILE = "cocktail.json"
FORMAT = "resilient-tune/cocktail"
FORMAT_VERSION = 1

#: Output dtypes accepted by name (``None`` / ``"auto"`` keeps each tensor's input dtype).
DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "float": "float32",
}


def normalize_dtype_name(dtype: object) -> str | None:
    """Return the canonical dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``) or ``None`` for auto.

    Accepts a name, an alias (``fp16``, ``bf16``, ...), ``"auto"``/``None`` or a floating ``torch.dtype``.
    """
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.").lower()
    if name == "auto":
        return None
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)} or 'auto'")
    return name


@dataclass(frozen=True)
class Recipe:
    """Method, weights and options of a merge.

    Attributes:
        method: Name of a registered merge method (see :func:`resilient_tune.merging.method_names`).
        weights: One weight per model, in the order the models are given. ``None`` until chosen (e.g. by auto
            weights).
        options: Method options (``density``, ``lambda``, ``gamma``, ``lines_alpha``, ``lines_beta``).
        normalize: Divide the weights by their sum before merging.
        dtype: Output dtype name, or ``None`` to keep each tensor's input dtype.
        seed: Seed of the random methods (DARE); merges with the same seed are bit-identical.
    """

    method: str = "linear"
    weights: tuple[float, ...] | None = None
    options: Mapping[str, float] = field(default_factory=dict)
    normalize: bool = False
    dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from .merging import get_method, resolve_options

        get_method(self.method)  # unknown name -> UsageError listing the valid ones
        if self.weights is not None:
            weights = tuple(as_floats(self.weights))
            object.__setattr__(self, "weights", weights)
        if not isinstance(self.options, Mapping):
            raise UsageError(
                f"options={self.options!r} must be a mapping of option name -> number, e.g. {{'density': 0.5}}"
            )
        if not isinstance(self.normalize, bool):
            raise UsageError(f"normalize={self.normalize!r} must be True or False")
        resolve_options(self.method, self.options)  # validates names and ranges
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "dtype", normalize_dtype_name(self.dtype))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UsageError(f"seed must be an int, got {self.seed!r}; pass a whole number such as seed=0")

    def resolved_options(self) -> dict[str, float]:
        """The method's default options overlaid with :attr:`options`."""
        from .merging import resolve_options

        return resolve_options(self.method, self.options)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; options include the method defaults that were in force."""
        return {
            "method": self.method,
            "weights": None if self.weights is None else list(self.weights),
            "options": self.resolved_options(),
            "normalize": self.normalize,
            "dtype": self.dtype,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict` (also reads the ``recipe`` entry of a ``cocktail.json``)."""
        if not isinstance(data, Mapping):
            raise UsageError(
                f"a recipe must be a JSON object, got {type(data).__name__}; pass the 'recipe' entry of a "
                "cocktail.json or a dict with method, weights, options, normalize, dtype, seed"
            )
        data = data.get("recipe", data)
        unknown = set(data) - {"method", "weights", "options", "normalize", "dtype", "seed"}
        if unknown:
            raise UsageError(
                f"unknown recipe fields {sorted(unknown)}; valid: method, weights, options, normalize, dtype, seed"
            )
        weights = data.get("weights")
        return cls(
            method=data.get("method", "linear"),
            weights=None if weights is None else tuple(weights),
            options=dict(data.get("options") or {}),
            normalize=bool(data.get("normalize", False)),
            dtype=data.get("dtype"),
            seed=data.get("seed", 0),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(
                f"the recipe is not valid JSON ({exc}); pass the text of a cocktail.json"
            ) from None
        return cls.from_dict(data)


def cocktail_document(
    recipe: Recipe,
    ingredients: Sequence[Mapping[str, Any]],
    *,
    version: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``cocktail.json``: format tag, recipe, ingredient identities and caller metadata."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"resilient-tune {version}",
        "recipe": recipe.to_dict(),
        "ingredients": [dict(i) for i in ingredients],
    }
    for key, value in (extra or {}).items():
        if key in doc:
            raise UsageError(f"metadata key {key!r} is reserved in cocktail.json; rename it")
        doc[key] = value
    return doc
