"""The merge-speed benchmark's agreement check: every output against the exact float64 merge of its inputs, read
one tensor at a time with ``safetensors.numpy`` (torch is never imported here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

AGREEMENT_ATOL = 1e-5  # fp32 sums taken in another order differ by ~1e-7 here; 1e-5 flags real differences


def _safetensors_keys(folder: str) -> dict[str, str]:
    from safetensors import safe_open

    where: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            where |= dict.fromkeys(f.keys(), str(path))
    return where


def check_outputs(
    inputs: list[str],
    weights: list[float],
    outputs: dict[str, str],
    reference: str | None,
    *,
    t: float | None = None,
) -> dict:
    """Compare each output with the exact float64 merge of the inputs, and with ``reference``'s output.

    The exact merge is the weighted sum ``Σ wᵢ·θᵢ``, or with ``t`` given the SLERP from ``inputs[0]`` to
    ``inputs[1]`` (:func:`slerp_float64`; ``weights`` unused).

    Reads with ``safetensors.numpy`` one tensor at a time (no torch import; float32 checkpoints). Only keys
    present on both sides are compared (transformers' ``save_pretrained`` drops GPT-2's tied
    ``lm_head.weight``; other tools may write it): the keys that differ are listed, not hidden.

    Returns:
        Per output name: keys compared, missing and extra keys, dtypes, the two max abs differences, and
        ``ok`` (every input key present and within ``AGREEMENT_ATOL`` of the exact sum).
    """
    import numpy as np
    from safetensors import safe_open

    in_keys = [_safetensors_keys(p) for p in inputs]
    out_keys = {name: _safetensors_keys(folder) for name, folder in outputs.items()}
    handles: dict[str, object] = {}

    def get(path: str, key: str) -> np.ndarray:
        if path not in handles:
            handles[path] = safe_open(path, framework="np")
        return handles[path].get_tensor(key)  # type: ignore[attr-defined]

    report: dict = {}
    for name, keys in out_keys.items():
        shared = sorted(set(keys) & set(in_keys[0]))
        ref_keys = out_keys.get(reference, {}) if reference and name != reference else {}
        diff_exact = diff_ref = 0.0
        dtypes: set[str] = set()
        for k in shared:
            got = get(keys[k], k)
            dtypes.add(str(got.dtype))
            if t is None:
                exact = sum(w * get(src[k], k).astype(np.float64) for w, src in zip(weights, in_keys))
            else:
                exact = slerp_float64(get(in_keys[0][k], k), get(in_keys[1][k], k), t)
            diff_exact = max(diff_exact, float(np.max(np.abs(got - exact), initial=0.0)))
            if k in ref_keys:
                diff_ref = max(
                    diff_ref, float(np.max(np.abs(got.astype(np.float64) - get(ref_keys[k], k)), initial=0.0))
                )
        missing = sorted(set(in_keys[0]) - set(keys))
        report[name] = {
            "keys_compared": len(shared),
            "missing_keys": missing,
            "extra_keys": sorted(set(keys) - set(in_keys[0])),
            "dtypes": sorted(dtypes),
            "max_abs_diff_vs_exact": diff_exact,
            "max_abs_diff_vs_reference": diff_ref if ref_keys else None,
            "ok": bool(shared) and not missing and diff_exact <= AGREEMENT_ATOL,
        }
    return report


def slerp_float64(a: Any, b: Any, t: float) -> Any:
    """SLERP of two arrays from ``a`` (t = 0) to ``b`` (t = 1) in float64, as mergekit 0.1.5 defines it: linear where
    the flattened arrays are within ``|cos| > 0.9995`` of (anti)parallel; a near-zero vector is not normalised."""
    import numpy as np

    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    dot = float(np.dot(a64 / (norm_a if norm_a > 1e-8 else 1.0), b64 / (norm_b if norm_b > 1e-8 else 1.0)))
    dot = min(max(dot, -1.0), 1.0)
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).reshape(a.shape)
