"""Result files: environment capture, atomic writes and schema validation.

Every JSON summary under results/ carries an ``env`` object so that each
number can be traced to a commit, library versions and hardware.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "results" / "schemas"


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Return the checked-out commit and whether tracked files outside results/ had uncommitted changes.

    Files under results/ are outputs: a session that regenerates several of
    them would otherwise mark every later one as made from a modified tree.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform's best guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture_env(device: str | None = None) -> dict[str, Any]:
    """Describe the software and hardware a result was measured on."""
    import numpy
    import scipy
    import torch
    import torchvision

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "scipy": scipy.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "gpu": gpu,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
    }


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves either the old or the new file.

    The bytes go to a temporary file in the same directory, are flushed and
    fsynced, and then renamed over the target; rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file as 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Serialize ``data`` as indented JSON and write it atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def load_schema(name: str) -> dict[str, Any]:
    """Load results/schemas/<name>.schema.json."""
    path = SCHEMA_DIR / f"{name}.schema.json"
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def validate(data: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError when ``data`` does not match the named schema."""
    import jsonschema

    jsonschema.validate(instance=data, schema=load_schema(schema_name))
