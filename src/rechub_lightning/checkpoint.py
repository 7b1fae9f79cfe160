"""Checkpoints that are never torn: written to a temporary file, then renamed into place."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "read_checkpoint"]


def read_checkpoint(path: str, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's contents (``weights_only=True``, on the CPU), with an error naming
    ``path`` when it is missing or is not a checkpoint (a CSV passed as ``--ckpt_path``, say).
    ``mmap=True`` maps the tensors instead of reading them (to look at a large file's metadata)."""
    if not os.path.exists(str(path)):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... for non-checkpoints
        first_line = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {first_line})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Like Lightning's ``TorchCheckpointIO``, but a process killed while saving leaves either the
    previous file or the complete new one (``os.replace`` is atomic on POSIX filesystems).

    Remote paths (``s3://`` ...) fall back to the default behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
