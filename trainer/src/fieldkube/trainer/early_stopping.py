"""Early stopping on the validation loss: a pure update, so a resumed run decides as an uninterrupted one
(its state, the best loss and the epochs without improvement, lives in the checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EarlyStopping:
    patience: int  # 0: never stop early
    min_delta: float

    def update(self, best: float, bad_epochs: int, val_loss: float) -> tuple[float, int, bool]:
        """(best, bad epochs, stop now) after an epoch that ended with ``val_loss``."""
        if val_loss < best - self.min_delta:
            best, bad_epochs = val_loss, 0
        else:
            bad_epochs += 1
        return best, bad_epochs, bool(self.patience) and bad_epochs >= self.patience
