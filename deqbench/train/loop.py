"""The training loop: warm-up, then implicit steps, an evaluation per epoch, checkpoints and clean stops.

One optimizer step trains on one global batch. The first ``plan.warmup_steps``
steps apply the unrolled cell (mode="warmup"), the rest solve for the
equilibrium (mode="implicit"). Adam's learning rate follows a cosine over the
run's own steps. After every epoch the test accuracy is measured, one JSON line
goes to <output>/log.jsonl and a checkpoint is written.

SIGINT or SIGTERM lets the current step finish, writes a checkpoint of the
exact position (epoch, next batch, every RNG state, the epoch's partial
sums) and returns status "interrupted". Resuming from it on the CPU repeats
the uninterrupted run bit for bit, because the data order, the augmentations
and the Jacobian-penalty draws depend only on (seed, epoch, batch) and all
other randomness is restored.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from deqbench.models.mdeq import MDEQClassifier, MDEQOutput
from deqbench.results import atomic_write_bytes
from deqbench.train.checkpointing import TrainerCheckpoints
from deqbench.train.distributed import DistContext, all_reduce_max, all_reduce_sum, convert_batch_norm
from deqbench.train.metrics import EpochMeter, peak_memory_bytes, reduce_step, solver_moments
from deqbench.train.progress import NullProgress, Progress
from deqbench.train.sampling import GlobalBatchSampler, SeededDataset, start_workers, worker_init
from deqbench.train.schedule import cosine_lr, jacobian_step
from deqbench.train.seeding import derive_seed, seed_everything
from deqbench.train.settings import CHECKPOINT_DIR, LOG_NAME, RunFailed, StopSignals, TrainOutcome, TrainSettings

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "LOG_NAME", "Trainer", "TrainOutcome", "TrainSettings"]

# Stream ids that keep derived seeds of different purposes apart.
_TRAIN_STREAM = 1
_LOADER_STREAM = 2


class Trainer(TrainerCheckpoints):
    """Trains one MDEQ classifier on the given datasets; construct it on every process of a run."""

    def __init__(
        self,
        settings: TrainSettings,
        train_set: Dataset,
        test_set: Dataset,
        ctx: DistContext | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = ctx or DistContext()
        self.device = torch.device(self.ctx.device)
        scenario, plan = settings.scenario, settings.plan

        # Identical weights on every process: the initialization draws from `seed` alone.
        seed_everything(settings.seed)
        model = MDEQClassifier(scenario.model, scenario.deq)
        if self.ctx.distributed:
            model = convert_batch_norm(model, self.device.type)
        self.model = model.to(self.device)
        self.network: nn.Module = self.model
        if self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

        # Dropout masks and Hutchinson probes: one stream per process, so processes draw different masks.
        self.train_seed = derive_seed(settings.seed, self.ctx.rank, _TRAIN_STREAM)
        seed_everything(self.train_seed)

        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=plan.lr, weight_decay=scenario.train.weight_decay)

        # Training order and augmentation seeds follow (seed, epoch, index) only.
        self.train_data = SeededDataset(train_set, settings.seed)
        self.sampler = GlobalBatchSampler(
            len(train_set),  # type: ignore[arg-type]
            scenario.train.batch_size,
            settings.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        if self.sampler.num_batches != plan.steps_per_epoch:
            raise ValueError(
                f"the plan has {plan.steps_per_epoch} steps per epoch but {len(train_set)} images "  # type: ignore[arg-type]
                f"at batch {scenario.train.batch_size} give {self.sampler.num_batches}; plan the run with the same data"
            )

        # Every process evaluates one contiguous shard of the test set.
        shards = np.array_split(np.arange(len(test_set)), self.ctx.world_size)  # type: ignore[arg-type]
        self.test_shard = Subset(test_set, shards[self.ctx.rank].tolist())

        # Position and bookkeeping; _restore() replaces them on resume.
        self.epoch = 0
        self.batch = 0  # next global batch of self.epoch
        self.step = 0  # optimizer steps done
        self.meter = EpochMeter()
        self.history: list[dict[str, Any]] = []
        self.unconverged_streak = 0
        self.elapsed_before = 0.0  # seconds of earlier segments of a resumed run
        self.epoch_elapsed_before = 0.0  # seconds already spent on the current epoch before a resume
        self.resumed_from: list[dict[str, Any]] = []
        self.checkpoint: Path | None = None
        self.stop_requested = False

    # ------------------------------------------------------------------ run

    def run(self, progress: Progress | None = None) -> TrainOutcome:
        """Train to the end of the plan, or until a stop request or a failure, and return the outcome."""
        progress = progress if (progress is not None and self.ctx.is_main) else NullProgress()
        settings, plan = self.settings, self.settings.plan
        epochs = settings.scenario.train.epochs

        # Start fresh or continue from the newest checkpoint.
        if settings.resume:
            self._restore()
        elif self.ctx.is_main:
            settings.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(settings.log_path, b"")
        self.segment_start = time.perf_counter()
        logger.info(
            "training %s for %d epoch(s) (%d steps, %d in warm-up) from step %d",
            settings.scenario.name, epochs, plan.total_steps, plan.warmup_steps, self.step,
        )

        progress.run_started(plan.total_steps, self.step)
        try:
            with StopSignals() as signals:
                self.signals = signals
                while self.epoch < epochs:
                    self._train_epoch(progress)
                    if self.batch < plan.steps_per_epoch:
                        return self._outcome("interrupted")
                    self._finish_epoch(progress)
                    if self.stop_requested and self.epoch < epochs:
                        return self._outcome("interrupted")
        except RunFailed as error:
            logger.error("training failed at step %d: %s", error.failure["step"], error)
            return self._outcome("failed", failure=error.failure)
        finally:
            progress.close()
        return self._outcome("completed")

    def _outcome(self, status: str, failure: dict[str, Any] | None = None) -> TrainOutcome:
        signum = self.signals.received if status == "interrupted" else None
        return TrainOutcome(
            status=status,
            history=list(self.history),
            wall_time_s=self.elapsed(),
            steps=self.step,
            checkpoint=self.checkpoint,
            failure=failure,
            signal_number=signum,
            resumed_from=list(self.resumed_from),
            seeds=self.seeds(),
        )

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.segment_start)

    def seeds(self) -> dict[str, Any]:
        """Describe every seed of the run, so that it can be repeated."""
        return {
            "seed": self.settings.seed,
            "model_init": f"torch, numpy and random seeded with {self.settings.seed} before building the model",
            "train_stream": [derive_seed(self.settings.seed, rank, _TRAIN_STREAM) for rank in range(self.ctx.world_size)],
            "data_order": "numpy default_rng([seed, epoch, 0x5EED]).permutation per epoch",
            "augmentation": "torch seeded per image from SeedSequence([seed, epoch, index])",
            "loader_generator": "torch.Generator seeded from SeedSequence([seed, rank, 2, epoch]) per epoch",
            "jacobian_draw": "numpy default_rng([seed, step, 0x4A52]).random() < probability",
        }

    # --------------------------------------------------------------- epochs

    def _train_loader(self) -> DataLoader:
        """Build the loader for the rest of the current epoch, from global batch self.batch on."""
        self.train_data.set_epoch(self.epoch)
        self.sampler.set_position(self.epoch, self.batch)
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.settings.seed, self.ctx.rank, _LOADER_STREAM, self.epoch))
        workers = self.settings.workers
        return DataLoader(
            self.train_data,
            batch_sampler=self.sampler,
            num_workers=workers,
            worker_init_fn=worker_init if workers > 0 else None,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self, progress: Progress) -> None:
        """Run the remaining steps of the current epoch; stops early, after a checkpoint, on a stop request."""
        plan = self.settings.plan
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.epoch_start = time.perf_counter()
        progress.epoch_started(self.epoch, self.settings.scenario.train.epochs, plan.steps_per_epoch, self.batch)

        for images, labels in start_workers(self._train_loader()):
            postfix = self._train_step(images, labels)
            self.batch += 1
            progress.step_done(postfix)

            # A stop request mid-epoch ends the epoch here; on its last batch the epoch finishes first.
            if self.stop_requested and self.batch < plan.steps_per_epoch:
                self.checkpoint = self._save_checkpoint(mid_epoch=True)
                logger.warning("stopped at epoch %d, batch %d; checkpoint %s", self.epoch + 1, self.batch, self.checkpoint)
                return

    def _finish_epoch(self, progress: Progress) -> None:
        """Evaluate, record the epoch, write its checkpoint and log line, and move to the next epoch."""
        train_time = self.epoch_elapsed_before + (time.perf_counter() - self.epoch_start)
        eval_start = time.perf_counter()
        test = self.evaluate()
        eval_time = time.perf_counter() - eval_start
        peak, memory_kind = peak_memory_bytes(self.ctx.device)

        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": cosine_lr(self.step - 1, self.settings.plan.total_steps, self.settings.plan.lr, self.settings.plan.lr_min),
            **self.meter.summary(),
            **test,
            "train_time_s": train_time,
            "eval_time_s": eval_time,
            "epoch_time_s": train_time + eval_time,
            "peak_memory_bytes": peak,
            "peak_memory_kind": memory_kind,
            "wall_time_s": self.elapsed(),
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.history.append(record)
        logger.info(
            "epoch %d: train loss %.4f, train acc %.2f%%, test acc %.2f%%, %.1f s",
            record["epoch"], record["train_loss"], record["train_acc"], record["test_acc"], record["epoch_time_s"],
        )

        # Advance first, so the checkpoint points at the start of the next epoch.
        self.epoch += 1
        self.batch = 0
        self.meter = EpochMeter()
        self.epoch_elapsed_before = 0.0
        self.checkpoint = self._save_checkpoint()
        if self.ctx.is_main:
            self._append_log(record)
        progress.epoch_done(record)

    # ----------------------------------------------------------------- step

    def _global_batch_images(self) -> int:
        """Images in the current global batch; the last batch of an epoch may be short."""
        size = self.settings.scenario.train.batch_size
        return min(size, len(self.train_data) - self.batch * size)

    def _train_step(self, images: Tensor, labels: Tensor) -> dict[str, Any]:
        """Take one optimizer step on this process's shard of the current global batch."""
        scenario, plan = self.settings.scenario, self.settings.plan
        jr = scenario.jacobian_reg

        # Schedule: learning rate, warm-up or implicit, Jacobian penalty or not.
        lr = cosine_lr(self.step, plan.total_steps, plan.lr, plan.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mode = "warmup" if self.step < plan.warmup_steps else "implicit"
        use_jacobian = jr.weight > 0 and self.epoch < jr.stop_epoch and jacobian_step(self.settings.seed, self.step, jr.probability)

        # Forward and backward. The summed loss is scaled so that the gradient
        # DDP averages over processes equals that of the global batch mean.
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        output: MDEQOutput = self.network(images, mode=mode, jacobian_samples=jr.samples if use_jacobian else 0)
        loss_sum = F.cross_entropy(output.logits.float(), labels, reduction="sum")
        loss = loss_sum * (self.ctx.world_size / self._global_batch_images())
        if output.jacobian_loss is not None:
            loss = loss + jr.weight * output.jacobian_loss
        loss.backward()

        # Sum this step's numbers over processes.
        forward = output.forward_stats if mode == "implicit" else None
        backward = output.backward.stats if (mode == "implicit" and output.backward is not None) else None
        local, local_max = self._step_numbers(output, labels, loss_sum, forward, backward)
        reduced, maxima = reduce_step(local, local_max, self.ctx)

        # Stop before the optimizer step on any non-finite value, keeping the weights of the last good step.
        if reduced["non_finite"] > 0:
            raise RunFailed(self._failure("non_finite", mode, reduced, forward, backward))
        self._track_convergence(mode, reduced, forward, backward)

        self.optimizer.step()
        self.step += 1
        reduced.update(
            steps=1.0,
            warmup_steps=float(mode == "warmup"),
            implicit_steps=float(mode == "implicit"),
            jacobian_steps=float(output.jacobian_loss is not None),
        )
        self.meter.add_step(reduced, maxima)
        self.stop_requested = reduced["stop_requested"] > 0

        return self._postfix(reduced, maxima, mode)

    def _step_numbers(
        self,
        output: MDEQOutput,
        labels: Tensor,
        loss_sum: Tensor,
        forward: Any,
        backward: Any,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Collect this process's sums (images, loss, solver moments, flags) and maxima of one step."""
        finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(output.logits).all())
        finite = finite and all(bool(torch.isfinite(part).all()) for part in output.state)
        if output.jacobian_loss is not None:
            finite = finite and bool(torch.isfinite(output.jacobian_loss).all())
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = finite and all(bool(torch.isfinite(g).all()) for g in grads)

        hook_stop = self.settings.stop_after_steps is not None and self.step + 1 >= self.settings.stop_after_steps
        local = {
            "loss_sum": float(loss_sum.detach()),
            "correct": float((output.logits.argmax(dim=1) == labels).sum()),
            "images": float(labels.numel()),
            "non_finite": float(not finite),
            "stop_requested": float(self.signals.received is not None or hook_stop),
        }
        if output.jacobian_loss is not None:
            local["jacobian_loss_sum"] = float(output.jacobian_loss.detach()) / self.ctx.world_size

        local_max: dict[str, float] = {}
        for prefix, stats in (("fwd", forward), ("bwd", backward)):
            moments = solver_moments(stats)
            if not moments:
                continue
            local[f"{prefix}_samples"] = moments["samples"]
            local[f"{prefix}_nfe_sum"] = moments["nfe_sum"]
            local[f"{prefix}_rel_sum"] = moments["rel_sum"]
            local[f"{prefix}_converged"] = moments["converged"]
            local[f"{prefix}_below"] = float((stats.rel_residual < self.settings.unconverged_residual).sum())
            local_max[f"{prefix}_nfe_max"] = moments["nfe_max"]
            local_max[f"{prefix}_rel_max"] = moments["rel_max"]
        return local, local_max

    def _track_convergence(self, mode: str, reduced: dict[str, float], forward: Any, backward: Any) -> None:
        """Count consecutive implicit steps in which no sample's forward or backward solve got below the residual limit.

        The limit is ``unconverged_residual`` (default 0.5), not the solvers'
        tolerance. A healthy TINY ends its 18 Broyden steps above tol = 1e-3 on
        every sample: the smoke budget measured forward relative residuals of
        0.08 on average and 0.20 at most, with 0% of samples converged. Even
        the untrained TINY stays below 0.5 (0.16 to 0.31 in train mode, 0.35 to
        0.45 in eval mode, 16 test images), so the default flags only a map
        that has become less contractive than at initialization.
        """
        limit = self.settings.max_unconverged_steps
        if mode != "implicit" or reduced.get("fwd_samples", 0.0) == 0:
            return
        forward_none = reduced.get("fwd_below", 0.0) == 0
        backward_none = reduced.get("bwd_samples", 0.0) == 0 or reduced.get("bwd_below", 0.0) == 0
        self.unconverged_streak = self.unconverged_streak + 1 if (forward_none and backward_none) else 0
        if limit > 0 and self.unconverged_streak >= limit:
            raise RunFailed(self._failure("unconverged", mode, reduced, forward, backward))

    def _failure(self, kind: str, mode: str, reduced: dict[str, float], forward: Any, backward: Any) -> dict[str, Any]:
        """Describe the failing step: what went wrong, where, and its solver statistics (this process's shard)."""
        if kind == "non_finite":
            reason = "the loss, the logits, the equilibrium state or a gradient became NaN or infinite"
        else:
            reason = (
                f"no sample's forward or backward solve reached a relative residual below "
                f"{self.settings.unconverged_residual:g} in {self.unconverged_streak} consecutive implicit steps "
                f"(limit {self.settings.max_unconverged_steps})"
            )
        images = max(reduced.get("images", 0.0), 1.0)
        return {
            "kind": kind,
            "reason": reason,
            "epoch": self.epoch + 1,
            "batch": self.batch,
            "step": self.step + 1,
            "mode": mode,
            "loss": reduced.get("loss_sum", math.nan) / images,
            "unconverged_streak": self.unconverged_streak,
            "forward": forward.summary() if forward is not None else None,
            "backward": backward.summary() if backward is not None else None,
            "last_good_checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
        }

    @staticmethod
    def _postfix(reduced: dict[str, float], maxima: dict[str, float], mode: str) -> dict[str, Any]:
        images = max(reduced["images"], 1.0)
        postfix: dict[str, Any] = {
            "loss": f"{reduced['loss_sum'] / images:.3f}",
            "acc": f"{100.0 * reduced['correct'] / images:.1f}",
            "mode": mode,
        }
        if reduced.get("fwd_samples", 0.0) > 0:
            postfix["fwd"] = f"{reduced['fwd_nfe_sum'] / reduced['fwd_samples']:.1f}"
        if reduced.get("bwd_samples", 0.0) > 0:
            postfix["bwd"] = f"{reduced['bwd_nfe_sum'] / reduced['bwd_samples']:.1f}"
        return postfix

    # ----------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Measure test accuracy and loss with the implicit layer in eval mode, summed over processes.

        Raises RunFailed on every process when any test image gives a NaN or
        infinite logit or equilibrium state, so that a diverged model never
        reaches a checkpoint.
        """
        self.model.eval()
        batch_size = self.settings.eval_batch_size
        if batch_size is None:
            batch_size = math.ceil(self.settings.scenario.train.batch_size / self.ctx.world_size)
        loader = DataLoader(self.test_shard, batch_size=batch_size, shuffle=False)
        # correct, loss, images, forward NFE, samples with NFE, images with a non-finite logit or state
        sums = torch.zeros(6, dtype=torch.float64)
        nfe_max = 0
        first_bad_stats = None  # forward statistics of this process's first batch with a non-finite sample
        for images, labels in loader:
            images, labels = images.to(self.device), labels.to(self.device)
            output: MDEQOutput = self.model(images, mode="implicit")
            sums[0] += float((output.logits.argmax(dim=1) == labels).sum())
            sums[1] += float(F.cross_entropy(output.logits.float(), labels, reduction="sum"))
            sums[2] += labels.numel()
            if output.forward_stats is not None:
                sums[3] += float(output.forward_stats.nfe.double().sum())
                sums[4] += output.forward_stats.nfe.numel()
                nfe_max = max(nfe_max, int(output.forward_stats.nfe.max()))
            bad = int(_non_finite_samples(output).sum())
            sums[5] += bad
            if bad and first_bad_stats is None:
                first_bad_stats = output.forward_stats
        self.model.train()

        all_reduce_sum(sums, self.ctx)
        maxima = all_reduce_max(torch.tensor([float(nfe_max)], dtype=torch.float64), self.ctx)
        correct, loss, images, nfe, nfe_samples, non_finite = sums.tolist()
        if non_finite > 0:
            failure = self._failure("non_finite", "eval", {"loss_sum": loss, "images": images}, first_bad_stats, None)
            failure["reason"] = (
                f"the logits or the equilibrium state of {int(non_finite)} of {int(images)} test images became "
                f"NaN or infinite in the evaluation after epoch {self.epoch + 1}"
            )
            failure["step"] = self.step  # the last optimizer step; evaluation takes none
            raise RunFailed(failure)
        return {
            "test_acc": 100.0 * correct / max(images, 1.0),
            "test_loss": loss / max(images, 1.0),
            "test_images": int(images),
            "test_nfe_mean": nfe / nfe_samples if nfe_samples else None,
            "test_nfe_max": int(maxima.item()) if nfe_samples else None,
        }


def _non_finite_samples(output: MDEQOutput) -> Tensor:
    """Flag the samples whose logits or equilibrium state hold a NaN or infinite value; (B,) bool."""
    bad = ~torch.isfinite(output.logits).all(dim=1)  # logits (B, num_classes)
    for part in output.state:
        bad |= ~torch.isfinite(part.flatten(1)).all(dim=1)  # part (B, C_i, H_i, W_i) -> (B, C_i * H_i * W_i)
    return bad
