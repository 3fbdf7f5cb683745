"""Compute devices: turn a user's ``--device`` string into a torch device that exists here, or one clear error."""

from __future__ import annotations

import torch

from gradmatch.errors import UserError


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ... as a torch device; a UserError when it is malformed or absent here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: gradmatch runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
