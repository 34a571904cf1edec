"""Checkpoints of the trainer: the exact position, every RNG state and the epoch log.

Trainer inherits these methods; they read and set the trainer's attributes
listed in the class body.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqbench.checkpoints import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from deqbench.results import atomic_write_bytes
from deqbench.train.distributed import DistContext, broadcast_object, gather_objects, run_on_main
from deqbench.train.metrics import EpochMeter
from deqbench.train.report import json_safe
from deqbench.train.sampling import SeededDataset, epoch_permutation
from deqbench.train.settings import TrainSettings

logger = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 3


class TrainerCheckpoints:
    """Save and restore the trainer's position; mixed into Trainer."""

    settings: TrainSettings
    ctx: DistContext
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_data: SeededDataset
    epoch: int
    batch: int
    step: int
    meter: EpochMeter
    history: list[dict[str, Any]]
    unconverged_streak: int
    elapsed_before: float
    epoch_elapsed_before: float
    epoch_start: float
    resumed_from: list[dict[str, Any]]
    checkpoint: Path | None

    def elapsed(self) -> float:
        raise NotImplementedError

    def _checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue from the current position, identical to not having stopped."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": gather_objects(capture_rng_state(), self.ctx),
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "permutation": torch.from_numpy(epoch_permutation(len(self.train_data), self.settings.seed, self.epoch)),
            "meter": self.meter.state(),
            "history": list(self.history),
            "unconverged_streak": self.unconverged_streak,
            "elapsed_s": self.elapsed(),
            "epoch_elapsed_s": self.epoch_elapsed_before + (time.perf_counter() - self.epoch_start),
            "resumed_from": list(self.resumed_from),
            "world_size": self.ctx.world_size,
            "seed": self.settings.seed,
        }

    def _save_checkpoint(self, mid_epoch: bool = False) -> Path | None:
        """Write a checkpoint of the current position from the main process; every process must call this.

        A checkpoint at an epoch's end is numbered by the epochs finished. A
        checkpoint in the middle of an epoch gets that epoch's 1-based number,
        so it sorts after the previous epoch's checkpoint, and the end of its
        own epoch replaces it.
        """
        state = self._checkpoint_state()
        path = None
        if self.ctx.is_main:
            number = self.epoch + 1 if mid_epoch else self.epoch
            path = save_checkpoint(
                self.settings.checkpoint_dir, number, state, self.settings.fingerprint, keep=CHECKPOINTS_KEPT
            )
        return broadcast_object(path, self.ctx)

    def _restore(self) -> None:
        """Load the newest valid checkpoint of this configuration and continue from its position."""
        loaded: dict[str, Any] = {}

        def find() -> str:
            found = latest_checkpoint(self.settings.checkpoint_dir, self.settings.fingerprint)
            if found is None:
                raise CheckpointError(f"no checkpoint to resume from in {self.settings.checkpoint_dir}")
            for warning in found[2]:
                logger.warning("%s", warning)
            loaded.update(found[0])
            return str(found[1])

        # Rank 0 picks the checkpoint; the other processes then load the same file.
        path = broadcast_object(run_on_main(find, self.ctx), self.ctx)
        state = (loaded or load_checkpoint(Path(path)))["state"]

        # The saved permutation must match the one this code draws, or the data order would change.
        position = state["position"]
        expected = epoch_permutation(len(self.train_data), self.settings.seed, position["epoch"])
        if not np.array_equal(state["permutation"].numpy(), expected):
            raise CheckpointError(
                f"checkpoint {path} was written with another data order for epoch {position['epoch'] + 1}; "
                "resume with the same data and seed, or start a fresh run with --overwrite"
            )
        if state["world_size"] != self.ctx.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                f"{self.ctx.world_size}; resume with the same number of processes"
            )

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch, self.step = position["epoch"], position["batch"], position["step"]
        self.meter.load_state(state["meter"])
        self.history = list(state["history"])
        self.unconverged_streak = state["unconverged_streak"]
        self.elapsed_before = state["elapsed_s"]
        self.epoch_elapsed_before = state["epoch_elapsed_s"] if self.batch > 0 else 0.0
        self.resumed_from = list(state["resumed_from"]) + [
            {"checkpoint": str(path), "epoch": self.epoch + 1, "batch": self.batch, "step": self.step}
        ]
        self.checkpoint = Path(path)

        # The log is rewritten from the checkpoint's history, dropping lines of epochs the checkpoint lacks.
        if self.ctx.is_main:
            text = "".join(json.dumps(json_safe(record), allow_nan=False) + "\n" for record in self.history)
            atomic_write_bytes(self.settings.log_path, text.encode("utf-8"))

        # RNG states last, after everything that might draw random numbers.
        restore_rng_state(state["rng"][self.ctx.rank])
        logger.info("resumed from %s at epoch %d, batch %d, step %d", path, self.epoch + 1, self.batch, self.step)

    def _append_log(self, record: dict[str, Any]) -> None:
        """Append one JSON line with a single write, then flush and fsync it."""
        line = json.dumps(json_safe(record), allow_nan=False) + "\n"
        with open(self.settings.log_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
