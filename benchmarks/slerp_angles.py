"""How far SLERP is from the linear mix for one fine-tune: per tensor, the angle between the base and the fine-tuned
weights, and the relative distance between SLERP and θ₀ + t·(θ − θ₀) at the same t.

    python benchmarks/slerp_angles.py BASE TUNED [--t 0.5] [--json]

BASE and TUNED are checkpoint folders or .safetensors files of the same architecture. Prints how many float tensors
(and what share of the weights) are within mergekit's 1.81° of (anti)parallel, where SLERP is the linear mix exactly,
the median and largest angle, and the largest ‖SLERP − linear‖ / ‖linear‖ over the tensors. Reads one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import torch

from resilient_tune.checkpoint import open_checkpoint
from resilient_tune.merging import SLERP_DOT_THRESHOLD, merge_tensor


def slerp_angles(base: str, tuned: str, t: float = 0.5) -> dict:
    """The per-tensor angle statistics of ``tuned`` against ``base`` and SLERP's distance from the linear mix at ``t``.

    Only float tensors present in both with the same shape are compared (their count is returned).
    """
    angles: list[float] = []
    fallback = weights = fallback_weights = 0
    max_rel = 0.0
    with open_checkpoint(base) as rb, open_checkpoint(tuned) as rt:
        shared = set(rb.keys())
        for key in rt:
            info = rt.info(key)
            if key not in shared or not info.dtype.is_floating_point or rb.info(key).shape != info.shape:
                continue
            a, b = rb.get(key).float().reshape(-1), rt.get(key).float().reshape(-1)
            norms = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b))
            cos = min(max(float(torch.dot(a, b)) / norms, -1.0), 1.0) if norms > 0 else 1.0
            angles.append(math.degrees(math.acos(cos)))
            weights += a.numel()
            if abs(cos) > SLERP_DOT_THRESHOLD:
                fallback += 1
                fallback_weights += a.numel()
            spherical = merge_tensor("slerp", [b], [1.0], base=a, options={"t": t})
            linear = torch.lerp(a, b, t)
            scale = float(torch.linalg.vector_norm(linear))
            if scale > 0:
                max_rel = max(max_rel, float(torch.linalg.vector_norm(spherical - linear)) / scale)
    angles.sort()
    return {
        "t": t,
        "tensors": len(angles),
        "linear_fallback_tensors": fallback,
        "linear_fallback_weight_share": fallback_weights / weights if weights else None,
        "angle_median_deg": angles[len(angles) // 2] if angles else None,
        "angle_max_deg": angles[-1] if angles else None,
        "max_relative_distance_to_linear": max_rel,
    }


def render(stats: dict) -> str:
    if not stats["tensors"]:
        return "no float tensors in common"
    threshold = math.degrees(math.acos(SLERP_DOT_THRESHOLD))
    return (
        f"{stats['tensors']} float tensors; {stats['linear_fallback_tensors']} within {threshold:.2f}° of (anti)parallel, "
        f"where SLERP is the linear mix ({100 * stats['linear_fallback_weight_share']:.1f}% of the weights); angle "
        f"median {stats['angle_median_deg']:.2f}°, max {stats['angle_max_deg']:.2f}°; largest "
        f"‖SLERP − linear‖ / ‖linear‖ at t = {stats['t']:g}: {stats['max_relative_distance_to_linear']:.2e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("base", help="the base checkpoint (folder or .safetensors)")
    p.add_argument("tuned", help="the fine-tuned checkpoint (folder or .safetensors)")
    p.add_argument(
        "--t", type=float, default=0.5, help="SLERP's t, the weight of the fine-tuned model (default 0.5)"
    )
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = p.parse_args(argv)
    if not 0.0 <= args.t <= 1.0:
        p.error(f"--t is {args.t}; pass a value in [0, 1]")
    stats = slerp_angles(args.base, args.tuned, args.t)
    print(json.dumps(stats, indent=2) if args.json else render(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
