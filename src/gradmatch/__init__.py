"""gradmatch: merge fine-tuned models by uncertainty-based gradient matching, and its baselines."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "merge", "SaveHessianCallback", "UserError"]

from gradmatch.errors import UserError


def __getattr__(name: str):
    # Keep `import gradmatch` light: the merge engine (and torch) load on first use.
    if name == "merge":
        from gradmatch.merge import merge

        return merge
    if name == "SaveHessianCallback":  # AdamW's second moment as a Hessian, for your own Trainer scripts
        from gradmatch.fisher.optimizer import SaveHessianCallback

        return SaveHessianCallback
    raise AttributeError(f"module 'gradmatch' has no attribute {name!r}")
