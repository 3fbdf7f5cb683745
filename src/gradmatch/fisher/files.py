"""The files of a Hessian: ``OUT/hessian/`` as a Hugging Face model folder whose tensors hold F, its
``fisher.json`` record, and the fingerprint of the model it describes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

#: The record beside the tensors of every Hessian gradmatch writes.
RECORD_FILE = "fisher.json"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict: every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def write_hessian(model: nn.Module, fisher: Mapping[str, torch.Tensor], folder: Path, metadata: dict) -> None:
    """Write ``folder`` as a Hugging Face model folder whose parameters hold ``fisher`` (float32), plus
    ``fisher.json``. Float buffers in the state dict (e.g. BatchNorm statistics) are written as zeros.

    The model's parameters are replaced by the Fisher: pass a model that is not used afterwards (or a copy). A Fisher
    holding NaN or ±Inf is refused here, the one place every Hessian gradmatch writes passes (the split's and the
    generated Fisher, AdamW's and IVON's): nothing is written, and the line says whether the model's own weights
    hold them."""
    from gradmatch.finite import check_finite, dumps, model_cause

    check_finite(((name, fisher[name]) for name, _ in model.named_parameters()), "the Hessian",
                 model_cause(model, str(metadata.get("model") or "the model")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = fisher[name].detach().to(device="cpu", dtype=torch.float32)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.data = torch.zeros(b.shape, dtype=torch.float32)
    model = model.to("cpu")
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:  # a plain torch module (a Trainer accepts one): its state dict, without a config
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / RECORD_FILE).write_text(dumps(metadata, indent=2) + "\n")
