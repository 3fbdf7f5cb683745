"""IVON (Shen et al., ICML 2024; the ivon-opt package) as the optimizer of `gradmatch train`, and its diagonal
Hessian estimate of the mean per-example loss read back under the model's parameter names."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from gradmatch.errors import UserError

log = logging.getLogger(__name__)

#: The Hessian's EMA rate when neither the ivon block nor the train config sets one, measured on the demo
#: (benchmarks/ivon_hessian.py, ~100 steps): ivon-opt's 0.99999 leaves the Hessian at its start (0.1% of the way);
#: 0.99 remembers ~100 steps. At stationarity Price's estimator adds about ½(1 − β2)·ess·E[ĝ²] (ĝ a mini-batch
#: gradient) to the Hessian, so a long run at large ess wants β2 nearer 1.
DEFAULT_BETA2 = 0.99

#: What fisher.json says the tensors are.
QUANTITY = "IVON's Hessian estimate of the mean per-example loss (its state 'hess')"

#: Below this a learning rate is AdamW-sized; IVON's (rescaled by hess_init + weight_decay, see make_ivon) is
#: SGD-sized, and an AdamW rate leaves the model almost where it started.
_ADAMW_SIZED_LR = 1e-2


def ivon_beta2(cfg) -> float:
    """The Hessian's EMA rate: the ivon block's beta2, else the train config's beta2 where the config sets it,
    else :data:`DEFAULT_BETA2`."""
    settings = cfg.ivon
    if settings is not None and settings.beta2 is not None:
        return float(settings.beta2)
    if "beta2" in cfg.model_fields_set:
        return float(cfg.beta2)
    return DEFAULT_BETA2


def make_ivon(model: nn.Module, cfg, num_train_examples: int):
    """An :class:`ivon.IVON` over ``model``'s trainable parameters, from a :class:`~gradmatch.config.TrainConfig`.

    lr = ``learning_rate``, beta1 = ``beta1``, weight_decay = ``weight_decay`` (IVON's prior precision δ),
    beta2 from :func:`ivon_beta2`; ``ess``, ``hess_init``, ``mc_samples`` and ``clip_radius`` from the ivon block
    (ess defaults to ``num_train_examples``, the N that gradient matching multiplies the Hessian by).

    The learning rate is on SGD's scale, not AdamW's: ivon-opt rescales it by (hess_init + δ), so a step is
    lr · (hess_init + δ)/(hess + δ) · momentum — plain SGD with momentum while the Hessian is near its start. The
    authors train with 0.1–0.5 (0.2 for ResNets on CIFAR with hess_init 0.1; GPT-2: lr · hess_init = 0.3 with an
    elementwise clip_radius of 1e-3); on the demo's ViT fine-tune 0.1–0.3. Parameters that do not require gradients are left out: IVON would perturb
    them with noise of precision ess·(hess + δ), and with no gradient their Hessian would only decay, so the noise
    would grow without bound."""
    import ivon

    settings = cfg.ivon
    if settings is None:
        from gradmatch.config.run import IvonSettings

        settings = IvonSettings()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"IVON: {type(model).__name__} has no parameters that require gradients")
    if num_train_examples <= 0 and settings.ess is None:
        raise UserError(f"IVON: ess defaults to the number of training examples, which is {num_train_examples}")
    ess = float(settings.ess if settings.ess is not None else num_train_examples)
    if cfg.learning_rate < _ADAMW_SIZED_LR:
        log.warning("IVON with learning_rate %g: an AdamW-sized rate. IVON's is SGD-sized (its authors use 0.1-0.5; "
                    "see gradmatch.fisher.ivon.make_ivon); at this rate the model barely moves", cfg.learning_rate)
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return ivon.IVON(params, lr=float(cfg.learning_rate), ess=ess, hess_init=float(settings.hess_init),
                     beta1=float(cfg.beta1), beta2=ivon_beta2(cfg), weight_decay=float(cfg.weight_decay),
                     mc_samples=int(settings.mc_samples), clip_radius=float(settings.clip_radius),
                     sync=world > 1)


def unwrap_ivon(optimizer):
    """The :class:`ivon.IVON` inside ``optimizer`` (accelerate's AcceleratedOptimizer wraps it); UserError if none."""
    import ivon

    seen = optimizer
    for _ in range(8):
        if isinstance(seen, ivon.IVON):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise UserError(f"not an IVON optimizer: {type(optimizer).__name__} (train with optimizer_name IVON)")


class IVONTrainer(Trainer):
    """The Hugging Face Trainer with IVON: every micro-batch's forward and backward runs on parameters drawn from
    IVON's posterior (``sampled_params(train=True)``), ``mc_samples`` times; evaluation, saving and the rest see
    the posterior mean, which is what the parameters hold outside a sample.

    Accumulation follows the authors' GPT-2 script: each (micro-batch, MC sample) pair is one IVON sample with its
    own noise and its own gradient (zeroed before it), and IVON averages its samples at ``step()``. So that the
    average is the gradient AdamW would have received, each sample's loss is the Trainer's share of the step's loss
    times the number of micro-batches in the step (IVON divides by the count of samples, the Trainer would have
    summed) — exact for token-count-weighted causal-LM losses too.

    Gradient clipping (``max_grad_norm``) clips each sample's gradient before IVON reads it, as the authors do
    (GPT-2: 1.0 per micro-step). The Trainer's own clipping is switched off: it runs after the last micro-batch,
    when IVON has already read every gradient, so it could not change the update (it would clip a spent gradient
    and log its norm). The logged ``grad_norm`` is the mean over the step's samples before clipping. IVON's own
    ``clip_radius`` bounds each element of the update instead."""

    def __init__(self, *args, train_config, num_train_examples: int, **kwargs):
        self.ivon_config = train_config
        self.num_train_examples = int(num_train_examples)
        super().__init__(*args, **kwargs)
        self.sample_max_grad_norm = float(self.args.max_grad_norm or 0.0)
        self.args.max_grad_norm = 0.0
        self._sample_norms: list[float] = []

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = make_ivon(model, self.ivon_config, self.num_train_examples)
        return self.optimizer

    @property
    def ivon(self):
        """The IVON optimizer itself (unwrapped from accelerate's)."""
        return unwrap_ivon(self.optimizer)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        optimizer = self.ivon
        model.train()
        inputs = self._prepare_inputs(inputs)
        micro_batches = int(getattr(self, "current_gradient_accumulation_steps", None)
                            or self.args.gradient_accumulation_steps)
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            scaled = self.loss_is_scaled_for_ga
        else:  # the Trainer's own rule: divided by num_items_in_batch (all micro-batches' items) already
            scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
        params = [p for group in optimizer.param_groups for p in group["params"] if p is not None and p.requires_grad]
        distributed = self.accelerator.num_processes > 1
        reported = torch.zeros((), device=self.args.device)
        for _ in range(optimizer.mc_samples):
            with optimizer.sampled_params(train=True):
                model.zero_grad(set_to_none=True)
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                share = loss if scaled else loss / micro_batches  # the Trainer's share of the step's loss
                # IVON syncs its averages across processes itself (sync=True); a DDP all-reduce of each sample's
                # gradient would pair one process's noise with every process's gradient.
                with self.accelerator.no_sync(model) if distributed else contextlib.nullcontext():
                    self.accelerator.backward(share * micro_batches)
                for p in params:  # a parameter the forward pass did not use: IVON reads its .grad all the same
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                limit = self.sample_max_grad_norm if self.sample_max_grad_norm > 0 else math.inf
                self._sample_norms.append(float(torch.nn.utils.clip_grad_norm_(params, limit)))
            reported += share.detach() / optimizer.mc_samples
        model.zero_grad(set_to_none=True)  # every gradient is in IVON's averages now
        return reported

    def _get_grad_norm(self, model, grad_norm=None):
        norms, self._sample_norms = self._sample_norms, []
        return sum(norms) / len(norms) if norms else None


def ivon_hessian(optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """IVON's Hessian (its per-group flat state ``hess``) as float32 CPU tensors keyed by ``model.named_parameters()``.

    IVON flattens each group's parameters in the group's order, skipping None (frozen parameters it holds are
    included, with their own entries). A parameter of the model that IVON does not hold (frozen and left out by
    :func:`make_ivon`) gets zeros: training measured no curvature for it. The Hessian excludes weight decay, which
    IVON adds to it as the prior precision."""
    optimizer = unwrap_ivon(optimizer)
    groups = optimizer.param_groups
    never_stepped = optimizer.current_step == 0 and all(
        "hess" in g and torch.all(g["hess"] == g["hess_init"]) for g in groups)
    if never_stepped or any(not isinstance(g.get("hess"), torch.Tensor) for g in groups):
        raise UserError("IVON state has no Hessian: the optimizer has taken no step (trained 0 steps?)")
    names = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for i, group in enumerate(groups):
        hess = group["hess"]
        offset = 0
        for p in group["params"]:
            if p is None:
                continue
            name = names.get(id(p))
            if name is None:
                raise UserError(f"IVON holds a parameter of shape {tuple(p.shape)} (group {i}) that "
                                f"{type(model).__name__} does not have: the optimizer belongs to another model")
            out[name] = hess[offset:offset + p.numel()].detach().view(p.shape).to(device="cpu", dtype=torch.float32)
            offset += p.numel()
        if offset != hess.numel():
            raise UserError(f"IVON's Hessian of group {i} has {hess.numel()} entries, its parameters {offset}")
    for name, p in model.named_parameters():
        if name not in out:
            out[name] = torch.zeros(p.shape, dtype=torch.float32)
    return {name: out[name] for name, _ in model.named_parameters()}


def ivon_metadata(optimizer, steps: int, num_train_examples: int) -> dict[str, Any]:
    """fisher.json's record of an IVON Hessian: estimator, N, IVON's settings and what the tensors are."""
    optimizer = unwrap_ivon(optimizer)
    group = optimizer.param_groups[0]

    def setting(key):
        values = {float(g[key]) for g in optimizer.param_groups}
        return values.pop() if len(values) == 1 else sorted(values)

    return {
        "estimator": "ivon",
        "num_examples": int(num_train_examples),
        "ess": setting("ess"),
        "hess_init": setting("hess_init"),
        "beta1": setting("beta1"),
        "beta2": setting("beta2"),
        "weight_decay": setting("weight_decay"),
        "learning_rate": float(group.get("initial_lr", group["lr"])),
        "clip_radius": setting("clip_radius"),
        "hess_approx": optimizer.hess_approx,
        "mc_samples": int(optimizer.mc_samples),
        "steps": int(steps),
        "quantity": QUANTITY,
    }
