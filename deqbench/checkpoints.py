"""Training checkpoints that survive preemption: atomic writes, SHA-256 files and safe loads.

A run's checkpoint folder contains, per saved epoch:

    epoch-0005.pt          torch.save of {"format": 1, "epoch", "fingerprint", "state"}
    epoch-0005.pt.sha256   "<hex digest>  epoch-0005.pt", the line format of sha256sum

The checksum lives in its own file so that the .pt stays a plain torch.save
file, and ``sha256sum -c epoch-0005.pt.sha256`` checks it by hand. Both files
are written atomically, the .pt first, so a crash leaves either the older
pair or a .pt whose checksum file is missing or stale. load_checkpoint
rejects both, and latest_checkpoint falls back to the previous epoch.
Loading uses torch.load(weights_only=True), which rebuilds only tensors and
plain containers and never runs code stored in the file.

One process writes a folder: save_checkpoint deletes leftover temporary
files and old epochs there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from deqbench.results import atomic_write_bytes

logger = logging.getLogger(__name__)

FORMAT = 1  # version of the payload layout
NAME_PATTERN = re.compile(r"^epoch-(\d{4,})\.pt$")
CHECKSUM_SUFFIX = ".sha256"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

# Types that torch.load(weights_only=True) rebuilds; anything else in a
# state is reported by key when saving.
SAFE_LEAF_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
SAFE_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
SAFE_CONTAINER_TYPES = (dict, OrderedDict, list, tuple)

_ABSENT = object()  # marks a fingerprint key that one side lacks


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or resumed from; the message names the file and why."""


# ------------------------------------------------------------------- names


def checkpoint_path(directory: Path, epoch: int) -> Path:
    """Return directory/epoch-NNNN.pt."""
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def checksum_path(path: Path) -> Path:
    """Return the SHA-256 file that belongs to a checkpoint."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def list_checkpoints(directory: Path) -> list[Path]:
    """Return the epoch-NNNN.pt files of ``directory``, newest epoch first; [] when there is no folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = NAME_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


# ------------------------------------------------------------------- saving


def save_checkpoint(directory: Path, epoch: int, state: dict, fingerprint: dict, keep: int = 3) -> Path:
    """Write directory/epoch-NNNN.pt and its .sha256 atomically, then keep only the newest ``keep``.

    ``state`` and ``fingerprint`` may contain tensors, numbers, strings, None,
    lists, tuples and dicts; anything else raises CheckpointError before a
    byte is written, because it could not be loaded with weights_only=True.
    The file just written is never pruned, even if older-numbered than others.
    """
    _check_save_arguments(epoch, state, fingerprint, keep)
    directory = Path(directory)
    path = checkpoint_path(directory, epoch)

    # Serialize in memory and prove that a weights_only load accepts the bytes.
    payload = {"format": FORMAT, "epoch": epoch, "fingerprint": dict(fingerprint), "state": dict(state)}
    data = _serialize(payload, path)
    digest = hashlib.sha256(data).hexdigest()

    # The .pt goes first, so a crash between the writes leaves a .pt that fails verification.
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(directory)
        atomic_write_bytes(path, data)
        atomic_write_bytes(checksum_path(path), f"{digest}  {path.name}\n".encode("ascii"))
    except OSError as error:
        raise CheckpointError(
            f"writing checkpoint {path} failed ({error}); checkpoints of other epochs are unchanged. "
            f"Free disk space or fix the permissions of {directory}"
        ) from error

    _prune(directory, keep, path)
    return path


def _check_save_arguments(epoch: int, state: Any, fingerprint: Any, keep: int) -> None:
    """Reject arguments that would produce an unloadable or misnamed checkpoint."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"epoch must be an integer >= 0; got {epoch!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise CheckpointError(f"keep must be an integer >= 1 (checkpoints kept on disk); got {keep!r}")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state must be a dict; got {type(state).__name__}")
    if not isinstance(fingerprint, Mapping):
        raise CheckpointError(f"fingerprint must be a dict; got {type(fingerprint).__name__}")


def _serialize(payload: dict, path: Path) -> bytes:
    """Return torch.save bytes of ``payload`` after checking that weights_only loading accepts them."""
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise CheckpointError(f"the state for {path} cannot be pickled ({error}); {_unsafe_hint(payload)}") from error
    data = buffer.getvalue()

    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"the state for {path} would not load with weights_only=True ({_describe_load_error(error)}); "
            f"{_unsafe_hint(payload)}"
        ) from error
    return data


def _unsafe_hint(payload: dict) -> str:
    """Name the first value a weights_only load rejects, and how to store it instead."""
    located = _first_unsafe_value(payload["state"], "state") or _first_unsafe_value(payload["fingerprint"], "fingerprint")
    where = f"{located[0]} is a {located[1]}; " if located else ""
    return (
        f"{where}store only tensors, numbers, strings, None, lists, tuples and dicts "
        "(convert numpy values with torch.as_tensor or float(), and RNG states with capture_rng_state())"
    )


def _first_unsafe_value(value: Any, key: str) -> tuple[str, str] | None:
    """Return (dotted key, type name) of the first value outside the weights_only types, or None."""
    kind = type(value)
    if kind in SAFE_LEAF_TYPES or kind in SAFE_TENSOR_TYPES:
        return None
    if kind not in SAFE_CONTAINER_TYPES:
        return key, f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, dict):
        for child_key, child in value.items():
            found = _first_unsafe_value(child_key, f"{key} (a key)") or _first_unsafe_value(child, f"{key}.{child_key}")
            if found:
                return found
        return None
    for index, child in enumerate(value):
        found = _first_unsafe_value(child, f"{key}[{index}]")
        if found:
            return found
    return None


def _remove_temporaries(directory: Path) -> None:
    """Delete temporary files of writes that a crash interrupted (atomic_write_bytes names them .<name>.*.tmp)."""
    for leftover in directory.glob(".epoch-*.tmp"):
        logger.warning("removing %s, left by an interrupted checkpoint write", leftover)
        leftover.unlink(missing_ok=True)


def _prune(directory: Path, keep: int, current: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints, never ``current``; failures are logged, not raised."""
    others = [path for path in list_checkpoints(directory) if path != current]
    for old in others[keep - 1 :]:
        try:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
        except OSError as error:
            logger.warning("could not delete old checkpoint %s: %s", old, error)


# ------------------------------------------------------------------ loading


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Verify a checkpoint's SHA-256 and load it with weights_only=True.

    Returns the payload {"format", "epoch", "fingerprint", "state"}. A missing
    or mismatched checksum, a file torch cannot read, a pickled object other
    than tensors and plain containers, or another layout raises
    CheckpointError naming the file and the reason.
    """
    path = Path(path)
    data = _read_verified(path)

    # A damaged or hostile file can fail anywhere in the zip reader and the
    # unpickler, with many exception types; every one means "unusable".
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_describe_load_error(error)}") from error

    _check_payload(payload, path)
    return payload


def _read_verified(path: Path) -> bytes:
    """Return the checkpoint's bytes after matching them against its .sha256 file."""
    sidecar = checksum_path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} not found") from error
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error})") from error

    try:
        fields = sidecar.read_text(encoding="ascii").split()
    except FileNotFoundError as error:
        raise CheckpointError(
            f"checkpoint {path} has no checksum file {sidecar.name}: its write was interrupted or it was "
            f"copied without it. If you trust the file, recreate it with "
            f"`sha256sum {path.name} > {sidecar.name}` in {path.parent}"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checksum file {sidecar} cannot be read ({error}); recreate it with sha256sum") from error

    recorded = fields[0].lower() if fields else ""
    if not SHA256_PATTERN.match(recorded):
        raise CheckpointError(f"checksum file {sidecar} contains no valid SHA-256 hex digest; recreate it with sha256sum")
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated: its SHA-256 is {actual} but {sidecar.name} "
            f"records {recorded} ({len(data)} bytes on disk)"
        )
    return data


def _describe_load_error(error: BaseException) -> str:
    """Return the informative line of a torch.load failure, without torch's advice to disable weights_only."""
    text = str(error)
    rejected = re.search(r"GLOBAL ([\w.]+)", text)
    if rejected:
        return (
            f"it references {rejected.group(1)}, which is neither a tensor nor a plain container; "
            "unpickling it could run code, so weights_only loading rejects it"
        )
    detail = re.search(r"WeightsUnpickler error: (.+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if detail:
        summary = detail.group(1)
    elif lines:
        summary = lines[0]
    else:
        summary = "no message"
    return f"{type(error).__name__}: {summary[:300]}"


def _check_payload(payload: Any, path: Path) -> None:
    """Raise CheckpointError unless ``payload`` has this module's layout."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a deqbench checkpoint of format {FORMAT} (found {found!r}); "
            "it was written by other code or another deqbench version"
        )
    epoch = payload.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise CheckpointError(f"checkpoint {path} has an invalid epoch {epoch!r}")
    for key in ("fingerprint", "state"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"checkpoint {path} has no {key} dict")


def latest_checkpoint(
    directory: Path, fingerprint: dict, map_location: Any = "cpu"
) -> tuple[dict, Path, list[str]] | None:
    """Return (payload, path, warnings) of the newest loadable checkpoint, or None when there is none.

    Unreadable, corrupted or truncated files are skipped, newest first, and
    each skip adds a warning that names the file and the reason. If every
    file is unusable this raises CheckpointError rather than returning None,
    because starting over would silently discard the run. A checkpoint whose
    fingerprint differs from ``fingerprint`` raises CheckpointError naming
    each differing key.
    """
    directory = Path(directory)
    paths = list_checkpoints(directory)
    if not paths:
        return None

    warnings: list[str] = []
    for path in paths:
        try:
            payload = load_checkpoint(path, map_location)
            _check_epoch_matches_name(payload, path)
        except CheckpointError as error:
            warnings.append(str(error))
            continue
        _check_fingerprint(payload["fingerprint"], fingerprint, path)
        return payload, path, warnings

    raise CheckpointError(
        f"no usable checkpoint in {directory}: {' | '.join(warnings)}. Move these files away to start "
        "over, or use a new --output directory"
    )


def _check_epoch_matches_name(payload: dict, path: Path) -> None:
    """Raise CheckpointError when a file's name and its stored epoch disagree (a renamed file)."""
    match = NAME_PATTERN.match(path.name)
    if match and int(match.group(1)) != payload["epoch"]:
        raise CheckpointError(f"checkpoint {path} stores epoch {payload['epoch']}, not the epoch in its name")


def _check_fingerprint(old: dict, new: dict, path: Path) -> None:
    """Raise CheckpointError naming every key whose value differs between two fingerprints."""
    differences = _differences(old, new, "")
    if not differences:
        return
    listed = "; ".join(f"{key}: {_show(before)} -> {_show(after)}" for key, before, after in differences)
    raise CheckpointError(
        f"checkpoint {path} was written by a different configuration ({listed}). Resume with the "
        "matching configuration, or use a new --output directory for this one"
    )


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Return the dotted keys (e.g. "deq.forward.max_nfe") whose values differ or exist on one side only."""
    return [key for key, _, _ in _differences(old, new, "")]


def _differences(old: Mapping, new: Mapping, prefix: str) -> list[tuple[str, Any, Any]]:
    """Return (dotted key, old value, new value) for every differing leaf, in key order."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            found += _differences(before, after, f"{dotted}.")
        elif _plain(before) != _plain(after):
            found.append((dotted, before, after))
    return found


def _plain(value: Any) -> Any:
    """Return ``value`` with tuples as lists and tensors as nested lists, so equal contents compare equal."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _show(value: Any) -> str:
    """Format a fingerprint value for an error message."""
    return "<absent>" if value is _ABSENT else repr(value)


# ----------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Return the states of torch (CPU and every CUDA device), numpy's global and Python's random generators.

    Every value is a tensor, number, string, None, list or dict, so the
    result can go into a checkpoint state and load with weights_only=True.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) MT19937 words, uint32 values
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set every generator captured by capture_rng_state() back to its saved state.

    Tensors may come back on any device (map_location); they are moved to the
    CPU, where torch expects generator states. CUDA states are restored for
    the devices present, and a mismatch in device count is logged.
    """
    try:
        numpy_state = state["numpy"]
        python_state = state["python"]
        torch.set_rng_state(state["torch"].cpu())
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].cpu().numpy().astype(np.uint32),
                numpy_state["position"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
        cuda_states = list(state["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"the RNG state cannot be restored ({type(error).__name__}: {error}); "
            "pass a dict made by capture_rng_state()"
        ) from error
    _restore_cuda_rng(cuda_states)


def _restore_cuda_rng(states: list[torch.Tensor]) -> None:
    """Restore per-device CUDA generator states for the devices this process can see."""
    if not states:
        return
    if not torch.cuda.is_available():
        logger.warning("CUDA RNG states of %d devices not restored because CUDA is unavailable", len(states))
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        logger.warning("the checkpoint contains CUDA RNG states of %d devices but %d are visible", len(states), count)
    for index, device_state in enumerate(states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), index)
