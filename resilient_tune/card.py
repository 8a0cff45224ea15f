"""A short model card (``README.md``) for every folder resilient-tune writes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["model_card"]


def model_card(doc: Mapping[str, Any]) -> str:
    """Render the model card from a ``cocktail.json`` document (see :func:`resilient_tune.recipe.cocktail_document`)."""
    recipe = doc["recipe"]
    ingredients = doc.get("ingredients", [])
    base = next((i["name"] for i in ingredients if i.get("role") == "base"), None)
    layout = doc.get("layout") or {}
    library = layout.get("library", "transformers")
    loader = (
        f"`{layout['loader']}`"
        if "loader" in layout
        else ("`AutoModel.from_pretrained(path)` (or the task's `AutoModelFor...` class)")
    )
    lines = ["---", f"library_name: {library}", "tags:", "- resilient-tune", "- merge", "- lm-cocktail"]
    if base is not None:
        lines.append(f"base_model: {json.dumps(base)}")
    lines += [
        "---",
        "",
        "# Merged model",
        "",
        f"Made with {doc.get('created_by', 'resilient-tune')} by the `{recipe['method']}` method.",
        "",
        "| ingredient | role | weight |",
        "|---|---|---|",
    ]
    for ingredient in ingredients:
        weight = ingredient.get("weight")
        shown = "" if weight is None else f"{weight:.6g}"
        lines.append(f"| `{ingredient['name']}` | {ingredient['role']} | {shown} |")
    options = ", ".join(f"{k}={v:g}" for k, v in sorted(recipe.get("options", {}).items())) or "none"
    lines += [
        "",
        f"Options: {options}; output dtype: {recipe.get('dtype') or 'as the inputs'}; seed: {recipe.get('seed', 0)}.",
        "",
        "The full recipe, the ingredient fingerprints and any probe metrics are in `cocktail.json`.",
        f"Load it like any checkpoint: {loader}.",
        "",
    ]
    return "\n".join(lines)
