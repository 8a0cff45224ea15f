"""A tiny Lightning fine-tune (a GPT-2 language model built from a config) runnable with LightningCLI.

The module holds a transformers model, so resilient folders include ``hf/``. Data is synthetic and offline: the
training task is one repeated token pattern; the general probes are random tokens. The module writes its initial
weights (θ₀ of global rank 0, before any restore) to ``<default_root_dir>/theta0.safetensors`` and its final weights
to ``final.safetensors`` so that the tests can check the resilient weights against them.

    python lit_app.py fit --trainer.default_root_dir=runs/a \\
        --trainer.callbacks+=resilient_tune.integrations.lightning.CocktailCallback \\
        --trainer.callbacks.init_args.alpha=0.3
    python lit_app.py fit --config cocktail.yaml --trainer.default_root_dir=runs/b
    RESILIENT_TUNE=1 RESILIENT_TUNE_ALPHA=0.3 python lit_app.py fit --trainer.default_root_dir=runs/c
    python lit_app.py write-general general.jsonl      # general probes as a file (for general_data / the env flag)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as L
import torch
import transformers
from safetensors.torch import save_file

from resilient_tune.distributed import close_process_group

VOCAB, LENGTH = 64, 8
THETA0, FINAL = "theta0.safetensors", "final.safetensors"


def tokens(n: int, seed: int, narrow: bool) -> list[dict[str, torch.Tensor]]:
    """``narrow``: one repeated pattern (the fine-tuning task); else uniform random tokens (general data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if narrow:
            start = int(torch.randint(0, 4, (1,), generator=g))
            ids = torch.tensor([(start + 3 * i) % 12 for i in range(LENGTH)])
        else:
            ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": ids})
    return out


def save_weights(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path))


class TinyLM(L.LightningModule):
    """A 2-layer GPT-2 (tied embeddings) fine-tuned with its own loss.

    Args:
        lr: AdamW learning rate.
        seed: Initialisation seed; ``seed_per_rank`` adds the global rank (ranks start from different weights,
            as an unseeded DDP run does; DDP broadcasts rank 0's).
    """

    def __init__(self, lr: float = 3e-2, seed: int = 0, seed_per_rank: bool = False) -> None:
        super().__init__()
        rank = int(os.environ.get("LOCAL_RANK", "0")) if seed_per_rank else 0
        torch.manual_seed(seed + rank)
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=LENGTH,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(config)
        self.lr = lr

    def setup(self, stage: str) -> None:
        root = Path(self.trainer.default_root_dir)
        if stage == "fit" and self.trainer.is_global_zero and not (root / THETA0).exists():
            root.mkdir(parents=True, exist_ok=True)
            save_weights(self, root / THETA0)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            save_weights(self, Path(self.trainer.default_root_dir) / FINAL)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TokenData(L.LightningDataModule):
    """32 training and 8 validation examples of the narrow task, batches of 8."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(tokens(32, 0, True), batch_size=8)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(tokens(8, 1, True), batch_size=8)


def write_general(path: str) -> None:
    """General probes as JSONL (random tokens): what ``general_data=`` / ``RESILIENT_TUNE_GENERAL_DATA`` read."""
    rows = [{k: v.tolist() for k, v in example.items()} for example in tokens(16, 2, False)]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    from lightning.pytorch.cli import LightningCLI

    if sys.argv[1:2] == ["write-general"]:
        write_general(sys.argv[2])
        return
    cli = LightningCLI(TinyLM, TokenData, save_config_kwargs={"overwrite": True})
    cocktails = [type(cb).__name__ for cb in cli.trainer.callbacks if type(cb).__name__ == "CocktailCallback"]
    print(json.dumps({"cocktail_callbacks": len(cocktails)}))
    close_process_group()


if __name__ == "__main__":
    main()
