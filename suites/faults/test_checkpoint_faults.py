"""Fault tests of deqbench.checkpoints: damaged files, crashes mid-write, hostile pickles, resume.

A preempted run must resume from its newest intact checkpoint with the same
model, optimizer, schedule and random streams. Damaged or foreign files are
skipped or rejected with the file named, and code stored in a file never runs.
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from deqbench import checkpoints
from deqbench.checkpoints import CheckpointError, capture_rng_state, restore_rng_state
from deqbench.scenarios import TINY, apply_overrides

FINGERPRINT = TINY.to_dict()


# ------------------------------------------------------------------ helpers


class Training:
    """A small model with dropout, Adam and a cosine schedule: the parts a checkpoint must restore."""

    def __init__(self) -> None:
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=10, eta_min=1e-6)
        self.metrics: list[dict] = []

    def step(self) -> float:
        """One optimizer step on a random batch drawn from torch's generator; return the loss."""
        inputs = torch.randn(5, 6)
        labels = torch.randint(0, 3, (5,))
        loss = torch.nn.functional.cross_entropy(self.model(inputs), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        value = loss.item()
        self.metrics.append({"step": len(self.metrics), "loss": value, "phase": "implicit"})
        return value

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "metrics": list(self.metrics),
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.metrics = list(state["metrics"])
        restore_rng_state(state["rng"])


def save_epochs(directory: Path, epochs: range, keep: int = 10) -> list[Path]:
    """Train one step per epoch and save after each; return the checkpoint paths."""
    training = Training()
    paths = []
    for epoch in epochs:
        training.step()
        paths.append(checkpoints.save_checkpoint(directory, epoch, training.state(), FINGERPRINT, keep=keep))
    return paths


def flip_byte(path: Path) -> None:
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_checksum(path: Path) -> None:
    """Write a .sha256 file that matches the file's current bytes."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    checkpoints.checksum_path(path).write_text(f"{digest}  {path.name}\n")


def temporaries(directory: Path) -> list[Path]:
    return list(directory.glob(".*.tmp"))


# --------------------------------------------------------------- round trip


def test_round_trip_training_state(tmp_path: Path) -> None:
    training = Training()
    for _ in range(3):
        training.step()
    path = checkpoints.save_checkpoint(tmp_path, 3, training.state(), FINGERPRINT)

    payload = checkpoints.load_checkpoint(path)
    restored = Training()
    restored.load(payload["state"])
    assert payload["format"] == checkpoints.FORMAT
    assert payload["epoch"] == 3
    assert payload["fingerprint"] == FINGERPRINT
    assert restored.metrics == training.metrics
    assert restored.scheduler.state_dict() == training.scheduler.state_dict()
    for name, tensor in training.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    for index, moments in training.optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(restored.optimizer.state_dict()["state"][index][key], value), (index, key)


def draw_from_every_generator() -> tuple[list[float], list[float], list[float]]:
    """Draw uniform and Gaussian numbers; Gaussian draws start with the generators' cached values."""
    torch_draws = torch.rand(4).tolist()
    numpy_draws = np.random.randn(3).tolist() + np.random.rand(2).tolist()
    python_draws = [random.gauss(0.0, 1.0) for _ in range(3)] + [random.random() for _ in range(2)]
    return torch_draws, numpy_draws, python_draws


def test_rng_restore_repeats_draws(tmp_path: Path) -> None:
    # One Gaussian draw each leaves the second of a pair cached in numpy's and
    # Python's state; the restored state must hold it too.
    np.random.randn()
    random.gauss(0.0, 1.0)
    path = checkpoints.save_checkpoint(tmp_path, 0, {"rng": capture_rng_state()}, FINGERPRINT)
    first = draw_from_every_generator()
    following = draw_from_every_generator()

    restore_rng_state(checkpoints.load_checkpoint(path)["state"]["rng"])
    repeated = draw_from_every_generator()
    assert first != following
    assert repeated[0] == first[0]
    assert repeated[1] == first[1]
    assert repeated[2] == first[2]


def test_resume_continues_identically(tmp_path: Path) -> None:
    training = Training()
    training.step()
    path = checkpoints.save_checkpoint(tmp_path, 1, training.state(), FINGERPRINT)
    uninterrupted = [training.step() for _ in range(3)]

    resumed = Training()
    resumed.load(checkpoints.load_checkpoint(path)["state"])
    assert [resumed.step() for _ in range(3)] == uninterrupted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_restore(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(7)
    path = checkpoints.save_checkpoint(tmp_path, 0, {"rng": capture_rng_state()}, FINGERPRINT)
    first = torch.rand(4, device="cuda").tolist()

    restore_rng_state(checkpoints.load_checkpoint(path, map_location="cuda")["state"]["rng"])
    assert torch.rand(4, device="cuda").tolist() == first


def test_rng_restore_rejects_other_dicts() -> None:
    with pytest.raises(CheckpointError) as raised:
        restore_rng_state({"torch": torch.get_rng_state()})
    assert "capture_rng_state" in str(raised.value)


# --------------------------------------------------------------- retention


def test_retention_keeps_newest(tmp_path: Path) -> None:
    save_epochs(tmp_path, range(5), keep=3)
    assert [path.name for path in checkpoints.list_checkpoints(tmp_path)] == [
        "epoch-0004.pt",
        "epoch-0003.pt",
        "epoch-0002.pt",
    ]
    assert sorted(path.name for path in tmp_path.glob("*.sha256")) == [
        "epoch-0002.pt.sha256",
        "epoch-0003.pt.sha256",
        "epoch-0004.pt.sha256",
    ]


def test_retention_keeps_file_just_written(tmp_path: Path) -> None:
    save_epochs(tmp_path, range(5, 8))
    written = checkpoints.save_checkpoint(tmp_path, 2, {"step": 2}, FINGERPRINT, keep=2)
    assert [path.name for path in checkpoints.list_checkpoints(tmp_path)] == ["epoch-0007.pt", written.name]


def test_stale_temporaries_removed(tmp_path: Path) -> None:
    leftover = tmp_path / ".epoch-0001.pt.abc123.tmp"
    leftover.write_bytes(b"half of an interrupted write")
    checkpoints.save_checkpoint(tmp_path, 2, {"step": 2}, FINGERPRINT)
    assert not leftover.exists()


# ------------------------------------------------------------ damaged files


def test_truncated_newest_skipped(tmp_path: Path) -> None:
    older, newest = save_epochs(tmp_path, range(1, 3))
    truncate(newest)

    payload, path, warnings = checkpoints.latest_checkpoint(tmp_path, FINGERPRINT)
    assert path == older
    assert payload["epoch"] == 1
    assert len(warnings) == 1
    assert str(newest) in warnings[0]
    assert "truncated" in warnings[0]


def test_truncated_with_matching_checksum(tmp_path: Path) -> None:
    older, newest = save_epochs(tmp_path, range(1, 3))
    truncate(newest)
    write_checksum(newest)

    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(newest)
    assert str(newest) in str(raised.value)
    assert "cannot be loaded" in str(raised.value)
    assert checkpoints.latest_checkpoint(tmp_path, FINGERPRINT)[1] == older


def test_flipped_byte_detected(tmp_path: Path) -> None:
    (path,) = save_epochs(tmp_path, range(1, 2))
    flip_byte(path)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert "corrupted" in str(raised.value)
    assert "SHA-256" in str(raised.value)


def test_missing_checksum_file(tmp_path: Path) -> None:
    (path,) = save_epochs(tmp_path, range(1, 2))
    checkpoints.checksum_path(path).unlink()
    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert f"sha256sum {path.name}" in str(raised.value)


def test_malformed_checksum_file(tmp_path: Path) -> None:
    (path,) = save_epochs(tmp_path, range(1, 2))
    checkpoints.checksum_path(path).write_text("not-a-digest  epoch-0001.pt\n")
    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(path)
    assert str(checkpoints.checksum_path(path)) in str(raised.value)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    missing = tmp_path / "epoch-0009.pt"
    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(missing)
    assert str(missing) in str(raised.value)
    assert "not found" in str(raised.value)


def test_all_checkpoints_unusable(tmp_path: Path) -> None:
    paths = save_epochs(tmp_path, range(1, 3))
    for path in paths:
        flip_byte(path)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.latest_checkpoint(tmp_path, FINGERPRINT)
    for path in paths:
        assert str(path) in str(raised.value)
    assert "--output" in str(raised.value)


def test_no_checkpoints_returns_none(tmp_path: Path) -> None:
    assert checkpoints.latest_checkpoint(tmp_path, FINGERPRINT) is None
    assert checkpoints.latest_checkpoint(tmp_path / "absent", FINGERPRINT) is None


def test_renamed_checkpoint_skipped(tmp_path: Path) -> None:
    (original,) = save_epochs(tmp_path, range(1, 2))
    renamed = checkpoints.checkpoint_path(tmp_path, 5)
    renamed.write_bytes(original.read_bytes())
    write_checksum(renamed)

    _, path, warnings = checkpoints.latest_checkpoint(tmp_path, FINGERPRINT)
    assert path == original
    assert str(renamed) in warnings[0]
    assert "stores epoch 1" in warnings[0]


def test_foreign_torch_file(tmp_path: Path) -> None:
    foreign = tmp_path / "epoch-0001.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    write_checksum(foreign)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(foreign)
    assert str(foreign) in str(raised.value)
    assert "not a deqbench checkpoint" in str(raised.value)


# --------------------------------------------------------------- fingerprint


def test_other_configuration_rejected(tmp_path: Path) -> None:
    save_epochs(tmp_path, range(1, 2))
    changed = apply_overrides(TINY, {"deq": {"forward": {"max_nfe": 30}}, "train": {"lr": 0.002}}).to_dict()

    with pytest.raises(CheckpointError) as raised:
        checkpoints.latest_checkpoint(tmp_path, changed)
    message = str(raised.value)
    assert "epoch-0001.pt" in message
    assert "deq.forward.max_nfe: 18 -> 30" in message
    assert "train.lr: 0.001 -> 0.002" in message
    assert "model." not in message
    assert "--output" in message


def test_fingerprint_diff_nested() -> None:
    old = {"model": {"channels": (24, 24), "dropout": 0.25}, "seed": 42, "only_old": 1}
    new = {"model": {"channels": [24, 24], "dropout": 0.3}, "seed": 42, "only_new": {"x": 1}}
    assert checkpoints.fingerprint_diff(old, new) == ["model.dropout", "only_new", "only_old"]


def test_fingerprint_diff_equal() -> None:
    assert checkpoints.fingerprint_diff(FINGERPRINT, TINY.to_dict()) == []


def test_fingerprint_absent_key_named(tmp_path: Path) -> None:
    save_epochs(tmp_path, range(1, 2))
    extended = dict(FINGERPRINT, data_source="imagefolder")
    with pytest.raises(CheckpointError) as raised:
        checkpoints.latest_checkpoint(tmp_path, extended)
    assert "data_source: <absent> -> 'imagefolder'" in str(raised.value)


# ------------------------------------------------------------ hostile files


class RunsShellCommand:
    """Pickles into a call of os.system, as a hostile checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_hostile(path: Path, marker: Path) -> None:
    payload = {"format": checkpoints.FORMAT, "epoch": 1, "fingerprint": FINGERPRINT, "state": {"x": RunsShellCommand(marker)}}
    torch.save(payload, path)


def test_hostile_payload_is_live(tmp_path: Path) -> None:
    hostile, marker = tmp_path / "epoch-0001.pt", tmp_path / "ran"
    write_hostile(hostile, marker)
    torch.load(hostile, weights_only=False)  # the unsafe load that checkpoints must never do
    assert marker.exists()


@pytest.mark.parametrize("checksum", ["matching", "missing", "stale"])
def test_hostile_payload_never_runs(checksum: str, tmp_path: Path) -> None:
    hostile, marker = tmp_path / "epoch-0001.pt", tmp_path / "ran"
    write_hostile(hostile, marker)
    if checksum == "matching":
        write_checksum(hostile)
    elif checksum == "stale":
        checkpoints.checksum_path(hostile).write_text(f"{'0' * 64}  {hostile.name}\n")

    with pytest.raises(CheckpointError) as raised:
        checkpoints.load_checkpoint(hostile)
    assert str(hostile) in str(raised.value)
    assert not marker.exists()


def test_hostile_newest_skipped(tmp_path: Path) -> None:
    (good,) = save_epochs(tmp_path, range(1, 2))
    hostile, marker = checkpoints.checkpoint_path(tmp_path, 2), tmp_path / "ran"
    write_hostile(hostile, marker)
    write_checksum(hostile)

    _, path, warnings = checkpoints.latest_checkpoint(tmp_path, FINGERPRINT)
    assert path == good
    assert "posix.system" in warnings[0]
    assert not marker.exists()


# ------------------------------------------------------------- crashes


def test_crash_in_replace_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (previous,) = save_epochs(tmp_path, range(1, 2))
    before = previous.read_bytes()

    def crash(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.save_checkpoint(tmp_path, 2, {"step": 2}, FINGERPRINT)
    monkeypatch.undo()

    assert "epoch-0002.pt" in str(raised.value)
    assert previous.read_bytes() == before
    assert checkpoints.load_checkpoint(previous)["epoch"] == 1
    assert not checkpoints.checkpoint_path(tmp_path, 2).exists()
    assert temporaries(tmp_path) == []


def test_crash_overwriting_same_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoints.save_checkpoint(tmp_path, 1, {"version": "first"}, FINGERPRINT)

    def crash(source, target):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError):
        checkpoints.save_checkpoint(tmp_path, 1, {"version": "second"}, FINGERPRINT)
    monkeypatch.undo()

    assert checkpoints.load_checkpoint(path)["state"] == {"version": "first"}


def test_crash_in_torch_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (previous,) = save_epochs(tmp_path, range(1, 2))
    before = previous.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a preemption signal arriving during serialization

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path, 2, {"step": 2}, FINGERPRINT)
    monkeypatch.undo()

    assert previous.read_bytes() == before
    assert not checkpoints.checkpoint_path(tmp_path, 2).exists()
    assert temporaries(tmp_path) == []


def test_crash_between_files_resumes_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (previous,) = save_epochs(tmp_path, range(1, 2))
    original_replace = os.replace

    def crash_on_checksum(source, target):
        if str(target).endswith(checkpoints.CHECKSUM_SUFFIX):
            raise OSError(5, "Input/output error")
        original_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_checksum)
    with pytest.raises(CheckpointError):
        checkpoints.save_checkpoint(tmp_path, 2, {"step": 2}, FINGERPRINT)
    monkeypatch.undo()

    _, path, warnings = checkpoints.latest_checkpoint(tmp_path, FINGERPRINT)
    assert path == previous
    assert "epoch-0002.pt" in warnings[0]
    assert "no checksum file" in warnings[0]


# ---------------------------------------------------------- invalid input


def test_unloadable_state_rejected(tmp_path: Path) -> None:
    state = {"metrics": [{"loss": np.float64(0.5)}]}
    with pytest.raises(CheckpointError) as raised:
        checkpoints.save_checkpoint(tmp_path, 1, state, FINGERPRINT)
    assert "state.metrics[0].loss" in str(raised.value)
    assert "numpy.float64" in str(raised.value)
    assert checkpoints.list_checkpoints(tmp_path) == []


def test_unpicklable_state_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        checkpoints.save_checkpoint(tmp_path, 1, {"hook": lambda value: value}, FINGERPRINT)
    assert "state.hook" in str(raised.value)
    assert checkpoints.list_checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    ("epoch", "keep", "named"),
    [(-1, 3, "epoch"), (True, 3, "epoch"), (1.0, 3, "epoch"), (1, 0, "keep"), (1, False, "keep")],
)
def test_invalid_save_arguments(epoch, keep, named: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        checkpoints.save_checkpoint(tmp_path, epoch, {}, FINGERPRINT, keep=keep)
    assert named in str(raised.value)
    assert repr(epoch if named == "epoch" else keep) in str(raised.value)
