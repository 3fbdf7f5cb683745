"""The files of a Hessian: ``OUT/hessian/`` as a Hugging Face model folder whose tensors hold F, its
``fisher.json`` record, and the fingerprint of the model it describes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from gradmatch.errors import UserError

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


def hessian_dtype(model: nn.Module | torch.dtype, requested: str | None = None) -> torch.dtype:
    """The dtype a Hessian is stored in: ``requested`` (merge's spelling, ``--out-dtype``), else bfloat16 for a
    bfloat16 model and float32 otherwise (sums are float32 whatever is stored)."""
    from gradmatch.config.merge import OUT_DTYPES

    if requested is not None:
        if requested not in OUT_DTYPES:
            raise UserError(f"--out-dtype {requested!r}: a Hessian is stored as {', '.join(OUT_DTYPES)}")
        return getattr(torch, requested)
    dtype = model if isinstance(model, torch.dtype) else next((p.dtype for p in model.parameters()), torch.float32)
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def check_storable(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> str | None:
    """Why ``tensors`` cannot be stored as ``dtype`` (an entry beyond its largest finite value), or None. Entries
    below the smallest subnormal (float16: 6e-8) become 0, which a Hessian may lose: it is the prior's scale."""
    if not dtype.is_floating_point or dtype in (torch.float32, torch.float64, torch.bfloat16):
        return None
    limit = torch.finfo(dtype).max
    for name, t in tensors:
        if t.numel() and float(t.abs().max()) > limit:
            return (f"the Hessian's entries reach {float(t.abs().max()):.4g} in {name!r}, beyond "
                    f"{str(dtype).removeprefix('torch.')}'s largest value {limit:.4g}: use --out-dtype bfloat16 or "
                    "float32; nothing was written")
    return None


def save_max_shard_size() -> str:
    """The shard size ``save_pretrained`` uses by default, so that every writer of a Hessian cuts it alike."""
    import inspect

    from transformers import PreTrainedModel

    return str(inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default)


def write_hessian(model: nn.Module, fisher: Mapping[str, torch.Tensor], folder: Path, metadata: dict,
                  dtype: torch.dtype = torch.float32) -> None:
    """Write ``folder`` as a Hugging Face model folder whose parameters hold ``fisher`` (stored as ``dtype``), plus
    ``fisher.json``. Float buffers in the state dict (e.g. BatchNorm statistics) are written as zeros.

    The model's parameters are replaced by the Fisher: pass a model that is not used afterwards (or a copy). A Fisher
    holding NaN or ±Inf is refused here, the one place every Hessian gradmatch writes passes (the split's and the
    generated Fisher, AdamW's and IVON's): nothing is written, and the line says whether the model's own weights
    hold them."""
    from gradmatch.finite import check_finite, dumps, model_cause

    check_finite(((name, fisher[name]) for name, _ in model.named_parameters()), "the Hessian",
                 model_cause(model, str(metadata.get("model") or "the model")))
    too_large = check_storable(((name, fisher[name]) for name, _ in model.named_parameters()), dtype)
    if too_large:
        raise UserError(too_large)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = fisher[name].detach().to(device="cpu", dtype=dtype)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.data = torch.zeros(b.shape, dtype=dtype)
    model = model.to("cpu")
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:  # a plain torch module (a Trainer accepts one): its state dict, without a config
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / RECORD_FILE).write_text(dumps(metadata, indent=2) + "\n")
