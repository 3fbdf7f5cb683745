"""AdamW's second moment as a Hessian: :class:`SaveHessianCallback` records, at each optimizer step, what the
conversion from ``exp_avg_sq`` to a Fisher's scale needs, and writes ``OUT/hessian/`` after training.

The conversion (docs/fisher.md, "AdamW's second moment"): at step k AdamW squares the gradient it is given,

    g_k = c_k · Σ_n a_n ∇ℓ_n           (n over the examples of the step's accumulated batch)

— ℓ_n an example's loss (a sequence's summed next-token NLL for a causal LM), a_n the weight the Trainer's loss
gives it (1/B for a mean over B examples; 1/T for transformers 5's causal-LM loss, a sum over the T predicted
tokens of the whole accumulated batch; divided by the accumulation steps where the Trainer divides), c_k ≤ 1 the
clipping factor of ``max_grad_norm``. Near an optimum the per-example gradients are nearly independent with mean
≈ 0, so E[g_k²] ≈ c_k² (Σ_n a_n²) F, F the mean of squared per-example gradients. With
v_K = Σ_k (1 − β2) β2^(K−k) g_k² (torch's ``exp_avg_sq``),

    F̂ = v_K / W_K,      W_K = Σ_k (1 − β2) β2^(K−k) c_k² Σ_n a_n²

— for a constant batch of B examples without clipping W_K = (1 − β2^K)/B, i.e. F̂ = B·v̂ with v̂ Adam's
bias-corrected second moment. The callback keeps W_K by the same recursion as Adam keeps v.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gradmatch.errors import UserError

try:  # the callback is a TrainerCallback; importing transformers here is what using it costs anyway
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[misc,assignment]


def per_example_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_n ℓ_n of a micro-batch from the model's logits and labels: cross-entropy of a classifier's labels, or a
    causal LM's next-token NLL summed over each sequence (labels shifted by one, −100 ignored)."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.detach().float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1).to(logits.device), ignore_index=-100, reduction="sum")


class SaveHessianCallback(TrainerCallback):
    """Save AdamW's second moment, converted to the mean of squared per-example gradients, as a Hessian.

    Two lines in a Hugging Face training script::

        trainer.add_callback(SaveHessianCallback(trainer))   # before trainer.train()
        # after training: OUT/hessian/ (OUT = args.output_dir, or the ``folder`` given here)

    At each step it records the examples of the accumulated batch, the weight the model's loss gave them (the
    ratio of the loss to the sum of per-example losses, measured on the logits), the Trainer's scaling for
    gradient accumulation and devices, and the clipping factor (from the norm before clipping that the Trainer's
    ``accelerator.clip_grad_norm_`` returns, which the callback keeps while training runs); at the
    end of training it divides AdamW's ``exp_avg_sq`` by the recursion W_K of the module docstring and writes
    the result with ``fisher.json`` (estimator ``adam``). :meth:`write` writes it elsewhere.
    """

    def __init__(self, trainer, folder: str | Path | None = None, *, num_train_examples: int | None = None):
        if getattr(trainer, "compute_loss_func", None) is not None or getattr(trainer, "label_smoother", None):
            raise UserError("SaveHessianCallback: a custom compute_loss_func or label smoothing changes each example's "
                            "weight in the gradient in a way the callback cannot read; train without it")
        self.trainer = trainer
        self.folder = None if folder is None else Path(folder)
        self.num_train_examples = num_train_examples
        self.weight = 0.0      # W_K
        self.steps = 0
        self.examples = 0      # examples of all steps
        self.clipped_steps = 0
        self._micro: list[tuple[int, float, bool]] = []  # (examples, Σ_n a_n² of the model's loss, num_items given)
        self._raw_norm: float | None = None
        self._restore = None
        self._handles: list = []
        self.history: list[dict[str, float]] = []  # per step: examples, Σ a², clipping factor (tests, diagnostics)
        self.untrained: list[str] = []
        self._deferred = False

    # ------------------------------------------------------------------ hooks

    def _model(self):
        model = self.trainer.model
        return getattr(model, "module", model)

    def on_train_begin(self, args, state, control, **kwargs):
        model = self._model()
        self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        accelerator = getattr(self.trainer, "accelerator", None)
        if args.max_grad_norm and args.max_grad_norm > 0 and accelerator is not None \
                and not hasattr(accelerator.clip_grad_norm_, "_gradmatch"):
            # The Trainer clips with accelerator.clip_grad_norm_, which returns the norm before clipping: keep it
            # (no extra pass over the gradients; a hook per parameter cost 1-2% of a small model's step).
            clip = accelerator.clip_grad_norm_

            def observed(parameters, max_norm, *a, **kw):
                norm = clip(parameters, max_norm, *a, **kw)
                if math.isfinite(float(max_norm)):
                    self._raw_norm = float(norm)
                return norm

            observed._gradmatch = True
            accelerator.clip_grad_norm_ = observed
            self._restore = (accelerator, clip)

    def _on_forward(self, module, args, kwargs, output):
        if not module.training or not torch.is_grad_enabled():
            return
        labels = kwargs.get("labels")
        loss = getattr(output, "loss", None) if not isinstance(output, (tuple, list)) else output[0]
        logits = getattr(output, "logits", None)
        if labels is None or loss is None or logits is None:
            raise UserError("SaveHessianCallback needs a model that computes its loss from labels and returns logits")
        total = float(per_example_loss_sum(logits, labels))
        B = int(labels.shape[0])
        scale = float(loss.detach()) / total if total > 0 else 0.0  # the loss is scale · Σ_n ℓ_n
        self._micro.append((B, B * scale * scale, "num_items_in_batch" in kwargs))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._micro:
            return
        trainer = self.trainer
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        given = self._micro[0][2]
        # What Trainer.training_step / compute_loss do to the model's loss (transformers 5): divide by the number of
        # micro-batches unless the loss is "scaled for gradient accumulation"; multiply by the number of processes
        # when tokens are averaged across devices; DDP then averages the gradients over the processes.
        scaled = trainer.loss_is_scaled_for_ga if getattr(trainer, "loss_is_scaled_for_ga", None) is not None \
            else bool(getattr(trainer, "model_accepts_loss_kwargs", False) and given)
        ga = 1.0 if scaled else float(getattr(trainer, "current_gradient_accumulation_steps", len(self._micro)))
        loss_scale = float(world) if (args.average_tokens_across_devices and given
                                      and getattr(trainer, "model_accepts_loss_kwargs", False)) else 1.0
        local = sum(s for _, s, _ in self._micro) * (loss_scale / ga) ** 2
        examples = sum(b for b, _, _ in self._micro)
        if world > 1:
            both = torch.tensor([local, float(examples)], dtype=torch.float64,
                                device=next(self._model().parameters()).device)
            dist.all_reduce(both)
            local, examples = float(both[0]) / world ** 2, int(both[1])
        c = 1.0
        if args.max_grad_norm and args.max_grad_norm > 0:
            if self._raw_norm is None:
                raise UserError("SaveHessianCallback could not see the gradient norm before clipping (the Trainer did "
                                "not clip through accelerator.clip_grad_norm_); train with max_grad_norm 0 or without it")
            c = min(1.0, float(args.max_grad_norm) / (self._raw_norm + 1e-6))  # torch's clip_grad_norm_ factor
        beta2 = self._beta2()
        self.weight = beta2 * self.weight + (1.0 - beta2) * c * c * local
        self.steps += 1
        self.examples += examples
        self.clipped_steps += c < 1.0
        self.history.append({"examples": examples, "sum_sq_weights": local, "clip": c})
        self._micro, self._raw_norm = [], None

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._restore is not None:
            accelerator, clip = self._restore
            accelerator.clip_grad_norm_, self._restore = clip, None
        if not self._deferred:
            self.write((self.folder or Path(args.output_dir)) / "hessian")

    def defer_writing(self) -> "SaveHessianCallback":
        """Do not write at the end of training (the caller calls :meth:`write`): ``gradmatch train`` writes the
        Hessian after the model, to record the written weights' fingerprint."""
        self._deferred = True
        return self

    # ------------------------------------------------------------------ the result

    def _optimizer(self):
        optimizer = self.trainer.optimizer
        return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it

    def _beta2(self) -> float:
        groups = self._optimizer().param_groups
        betas = {float(g["betas"][1]) for g in groups if "betas" in g}
        if len(betas) != 1:
            raise UserError("SaveHessianCallback needs AdamW with one β2 for every parameter group "
                            f"(found {sorted(betas) or 'none'})")
        return betas.pop()

    def hessian(self) -> dict[str, torch.Tensor]:
        """F̂ = exp_avg_sq / W_K for every parameter (float32, CPU; zeros for a parameter without state: frozen)."""
        if self.steps == 0 or self.weight <= 0:
            raise UserError("the optimizer took no step: there is no second moment to save as a Hessian")
        optimizer = self._optimizer()
        state = optimizer.state
        out, missing = {}, []
        for name, p in self._model().named_parameters():
            v = state.get(p, {}).get("exp_avg_sq")
            if v is None:
                missing.append(name)
                out[name] = torch.zeros(p.shape, dtype=torch.float32)
                continue
            step = state[p].get("step")
            if step is not None and int(step) != self.steps:
                raise UserError(f"parameter {name} took {int(step)} optimizer steps but the callback saw "
                                f"{self.steps}: add SaveHessianCallback before training starts")
            out[name] = (v.detach().float() / self.weight).cpu()
        self.untrained = missing
        return out

    def record(self) -> dict[str, Any]:
        from gradmatch import __version__

        args = self.trainer.args
        return {"estimator": "adam", "num_examples": self.num_train_examples, "beta2": self._beta2(),
                "steps": self.steps, "effective_batch_size": self.examples / max(1, self.steps),
                "examples_seen": self.examples, "conversion_weight": self.weight,
                "clipped_steps": self.clipped_steps, "max_grad_norm": args.max_grad_norm,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "untrained_parameters": self.untrained,
                "quantity": "AdamW exp_avg_sq / W_K: the mean over examples of squared per-example gradients of "
                            "the loss, near the end of training (docs/fisher.md)",
                "gradmatch_version": __version__}

    def write(self, folder: str | Path, *, weights_fingerprint: str | None = None, extra: dict | None = None,
              in_place: bool = False) -> Path:
        """Write the Hessian as a Hugging Face model folder ``folder`` (tensors F̂) with ``fisher.json``. With
        ``in_place`` the trained model's own parameters are replaced by F̂ to write it (no copy of the model: for a
        caller that has saved the model and is done with it); otherwise a copy is written."""
        import copy

        from gradmatch.fisher.files import model_fingerprint, write_hessian

        folder = Path(folder)
        model = self._model()
        fisher = self.hessian()
        record = {**self.record(), "model_fingerprint": model_fingerprint(model),
                  "weights_fingerprint": weights_fingerprint, **(extra or {})}
        if self.num_train_examples is None:
            dataset = getattr(self.trainer, "train_dataset", None)
            record["num_examples"] = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        shell = model if in_place else copy.deepcopy(model).to("cpu")  # write_hessian replaces its parameters
        write_hessian(shell, fisher, folder, record)
        return folder

