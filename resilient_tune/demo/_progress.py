"""A quiet progress bar for the demo's ``Trainer`` runs: one bar, the loss and α as its postfix."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["DemoProgress", "use_demo_progress"]


class DemoProgress(TrainerCallback):
    """A tqdm bar over the training steps showing the running loss and the latest α chosen by the policy.

    Replaces the Trainer's own printer, which prints every log dict (dozens of ``cocktail/*`` keys) on a line.
    """

    def __init__(self, desc: str = "fine-tuning") -> None:
        self.desc = desc
        self._bar: Any = None
        self._postfix: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if self._bar is None or not logs:
            return
        if "loss" in logs:
            self._postfix["loss"] = f"{logs['loss']:.3f}"
        if "cocktail/alpha" in logs:
            self._postfix["α"] = f"{logs['cocktail/alpha']:.2f}"
        self._bar.set_postfix(self._postfix, refresh=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def use_demo_progress(trainer: Any, desc: str = "fine-tuning") -> DemoProgress:
    """Swap the Trainer's progress/printer callbacks for a :class:`DemoProgress` (added last, so it sees the
    α that ``CocktailCallback`` logs at an evaluation)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress = DemoProgress(desc)
    trainer.add_callback(progress)
    return progress
