"""One rule per layer type for the exact per-example squared gradients of its parameters: what the forward hook
saves, how the saved input and the output gradient give Σ_b g_b² (and, for weights shared between layers, each
example's rows of the gradient, summed over uses before squaring)."""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

#: Largest block of per-example gradients (elements) formed at once. On CPUs an 8 MB block stays in cache
#: between the matmul that writes it and the squaring that reads it (measured about 2x faster than one
#: block per batch for MiniLM's feed-forward layers, and fewer, larger operations than one example at a
#: time); GPUs want large blocks.
_MAX_BLOCK_CPU = 1 << 21
_MAX_BLOCK_GPU = 1 << 25


def max_block(t: torch.Tensor) -> int:
    return _MAX_BLOCK_GPU if t.is_cuda else _MAX_BLOCK_CPU


def own_type(module: nn.Module) -> type:
    """The module's own class: FSDP2 makes each module it wraps an instance of a subclass (FSDPLinear of Linear)."""
    return next(cls for cls in type(module).__mro__ if not cls.__name__.startswith("FSDP"))


def sum_of_squares(per_example: torch.Tensor) -> torch.Tensor:
    """Σ_b x_b² over the first dimension. On GPUs a norm reads the block once (memory-bound there);
    on CPUs squaring in place and summing is faster."""
    if per_example.is_cuda:
        return torch.linalg.vector_norm(per_example, dim=0).square_()
    return per_example.square_().sum(0)


def add_squares(acc: torch.Tensor, per_example: torch.Tensor) -> None:
    """acc += Σ_b x_b². On CPUs one multiply-add per example (acc += x_b·x_b), which reads each block once and makes
    no temporary: 1.5× faster than squaring, summing and adding for the blocks of 2–6 examples a CPU forms."""
    if per_example.is_cuda:
        acc.add_(torch.linalg.vector_norm(per_example, dim=0, dtype=acc.dtype).square_())
        return
    for x in per_example:
        acc.addcmul_(x, x)  # a bfloat16 block is squared in the sums' float32


def linear_squares(A: torch.Tensor, G: torch.Tensor, weight_acc: torch.Tensor | None,
                   bias_acc: torch.Tensor | None) -> None:
    """Add Σ_b (G_bᵀ A_b)² to ``weight_acc`` (and Σ_b (Σ_t G_bt)² to ``bias_acc``).

    A: (B, ..., in) layer inputs, G: (B, ..., out) gradients of the layer outputs, in the model's dtype: each
    example's weight gradient is one matmul in that dtype (a bfloat16 model's on the CPU's or GPU's bfloat16 units,
    rounded to bfloat16 as autograd's own weight gradient is), squared and summed in the accumulators' dtype.
    """
    B = A.shape[0]
    if weight_acc is None and bias_acc is None:
        return
    acc_dtype = (weight_acc if weight_acc is not None else bias_acc).dtype
    if A.dim() == 2:
        # One token per example: the per-example gradient is an outer product, its square one too.
        G, A = G.to(acc_dtype), A.to(acc_dtype)
        if weight_acc is not None:
            weight_acc.add_(torch.mm(G.square().t(), A.square()))
        if bias_acc is not None:
            bias_acc.add_(G.square().sum(0))
        return
    A = A.reshape(B, -1, A.shape[-1])
    G = G.reshape(B, -1, G.shape[-1])
    if bias_acc is not None:
        bias_acc.add_(G.to(acc_dtype).sum(1).square().sum(0))
    if weight_acc is None:
        return
    dtype = torch.promote_types(A.dtype, G.dtype)
    A, G = A.to(dtype), G.to(dtype)
    step = max_block(A) // weight_acc.numel()
    if step >= 1:
        for start in range(0, B, step):
            per_example = torch.bmm(G[start:start + step].transpose(1, 2), A[start:start + step])  # (b, out, in)
            add_squares(weight_acc, per_example)
        return
    # A weight larger than a block (an LM head: vocabulary × hidden): one example's gradient by blocks of rows.
    rows = max(1, max_block(A) // weight_acc.shape[1])
    for b in range(B):
        for start in range(0, weight_acc.shape[0], rows):
            block = torch.mm(G[b, :, start:start + rows].t(), A[b])  # (rows, in)
            weight_acc[start:start + rows].addcmul_(block, block)


def _per_token(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and output gradients as (batch, tokens, features), in their common dtype."""
    B = A.shape[0]
    dtype = torch.promote_types(A.dtype, G.dtype)
    return A.reshape(B, -1, A.shape[-1]).to(dtype), G.reshape(B, -1, G.shape[-1]).to(dtype)


def sums_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype squares are summed in for a tensor of ``t``'s dtype: float32, or float64 for a float64 model."""
    return torch.promote_types(t.dtype, torch.float32)


class LayerRule:
    """The closed form of one layer type. ``save`` runs in the forward hook (None: the module does not fit the
    closed form after all, and is recomputed instead); ``accumulate`` in the backward hook, adding Σ_b g_b² of
    each owned parameter to ``acc`` (attribute -> accumulator, None for a shared weight summed elsewhere);
    ``rows`` (weights that may be shared: Linear, Conv1D, Embedding) gives each example's rows of the weight's
    gradient, so that a shared matrix sums its uses before squaring."""

    name: ClassVar[str]
    shareable: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def per_example(self, x: torch.Tensor, out: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) with the batch in the first dimension (a rule may expand a row shared by the batch)."""
        return x, out

    def save(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Any:
        return x.detach(), x._version

    def accumulate(self, module: nn.Module, saved: Any, G: torch.Tensor, acc: dict[str, torch.Tensor | None]) -> None:
        raise NotImplementedError

    def rows(self, module: nn.Module, saved: Any, G: torch.Tensor, rows: slice) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} weights cannot be shared")

    def add_rows(self, module: nn.Module, saved: Any, G: torch.Tensor, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """``out`` + :meth:`rows` (a rule that can add in place, without a block of its own, says so here)."""
        return out.add_(self.rows(module, saved, G, rows))

    @staticmethod
    def input_of(saved: Any) -> torch.Tensor:
        return saved[0]

    @staticmethod
    def modified(saved: Any) -> bool:
        """The saved input was changed in place after the forward (its gradients would be wrong)."""
        x, version = saved
        return version is not None and x._version != version


class LinearRule(LayerRule):
    name, shareable = "linear", True

    def matches(self, module):
        return own_type(module) is nn.Linear

    def accumulate(self, module, saved, G, acc):
        linear_squares(saved[0], G, acc.get("weight"), acc.get("bias"))

    def rows(self, module, saved, G, rows):
        """Rows ``rows`` of each example's gradient of the weight (out, in): G_b[:, rows]ᵀ A_b."""
        A, G = _per_token(saved[0], G)
        block = torch.bmm(G[:, :, rows].transpose(1, 2), A)
        return block.to(sums_dtype(block))


class Conv1DRule(LayerRule):
    """transformers' Conv1D (GPT-2): y = x·W + b with W of shape (in, out) — a Linear layer with W transposed."""

    name, shareable = "conv1d", True

    def matches(self, module):
        return own_type(module).__name__ == "Conv1D" and hasattr(module, "nf") \
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2 \
            and module.weight.shape[1] == module.nf

    def accumulate(self, module, saved, G, acc):
        weight = acc.get("weight")
        linear_squares(saved[0], G, None if weight is None else weight.t(), acc.get("bias"))

    def rows(self, module, saved, G, rows):
        """Rows ``rows`` of each example's gradient of the weight (in, out): A_b[:, rows]ᵀ G_b."""
        A, G = _per_token(saved[0], G)
        block = torch.bmm(A[:, :, rows].transpose(1, 2), G)
        return block.to(sums_dtype(block))


class EmbeddingRule(LayerRule):
    """Each example's output gradients scattered into the rows it touches (keys example × row), squared, added.
    The padding row gets nothing, as in PyTorch."""

    name, shareable = "embedding", True

    def matches(self, module):
        return own_type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq \
            and not module.sparse

    def per_example(self, x, out, batch_size):
        # A row shared by the batch (BERT's and GPT-2's position ids): each example gets its own copy, so that
        # its output gradient stays per example.
        if x.shape[0] == 1 and batch_size > 1:
            return x.expand(batch_size, *x.shape[1:]), out.expand(batch_size, *out.shape[1:])
        return x, out

    def accumulate(self, module, saved, G, acc):
        weight = acc.get("weight")
        if weight is None:
            return
        ids, G = saved[0], G.to(weight.dtype)
        B, dim = ids.shape[0], G.shape[-1]
        ids = ids.reshape(B, -1)
        G = G.reshape(B, -1, dim)
        num_rows = module.num_embeddings
        keys = torch.arange(B, device=ids.device).unsqueeze(1) * num_rows + ids
        keys, G = keys.reshape(-1), G.reshape(-1, dim)
        if module.padding_idx is not None:  # PyTorch never updates the padding row
            keep = ids.reshape(-1) != module.padding_idx
            keys, G = keys[keep], G[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        per_example_rows = torch.zeros(unique.numel(), dim, dtype=G.dtype, device=G.device).index_add_(0, inverse, G)
        weight.index_add_(0, unique % num_rows, per_example_rows.square_())

    def rows(self, module, saved, G, rows):
        """Rows ``rows`` of each example's gradient: its output gradients scattered to its ids in those rows."""
        B, dim = saved[0].shape[0], G.shape[-1]
        return self.add_rows(module, saved, G, rows,
                             torch.zeros(B, rows.stop - rows.start, dim, dtype=sums_dtype(G), device=G.device))

    def add_rows(self, module, saved, G, rows, out):
        """Scatter each example's output gradients at its ids in ``rows`` into ``out`` (B, rows, dim) directly."""
        ids = saved[0]
        B, dim = ids.shape[0], G.shape[-1]
        ids = ids.reshape(B, -1)
        G = G.reshape(B, -1, dim).to(out.dtype)
        inside = (ids >= rows.start) & (ids < rows.stop)
        if module.padding_idx is not None:
            inside &= ids != module.padding_idx
        b, t = inside.nonzero(as_tuple=True)
        out.view(-1, dim).index_add_(0, b * (rows.stop - rows.start) + (ids[b, t] - rows.start), G[b, t])
        return out


class LayerNormRule(LayerRule):
    """Per-example token sums of G·x̂ (weight) and G (bias), x̂ recomputed from the input."""

    name = "layernorm"

    def matches(self, module):
        return own_type(module) is nn.LayerNorm

    def accumulate(self, module, saved, G, acc):
        G = G.to(next(a for a in acc.values() if a is not None).dtype)
        x = saved[0].to(G.dtype)
        B = x.shape[0]
        x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)  # (x − mean) / sqrt(var + eps)
        shape = (B, -1, *module.normalized_shape)
        if acc.get("weight") is not None:
            acc["weight"].add_((G * x_hat).reshape(shape).sum(1).square().sum(0))
        if acc.get("bias") is not None:
            acc["bias"].add_(G.reshape(shape).sum(1).square().sum(0))


class RMSNormRule(LayerRule):
    """y = w·x̂, x̂ = x/√(mean x² + ε) computed in float32 and cast back to the input's dtype, as transformers' Llama,
    Qwen, Mistral and SmolLM2 norms do: per-example token sums of G·x̂. A variant whose output is not w·x̂ (e.g.
    (1 + w)·x̂) is recomputed instead."""

    name = "rmsnorm"

    def matches(self, module):
        own = [n for n, _ in module.named_parameters(recurse=False)]
        return own_type(module).__name__.endswith("RMSNorm") and own == ["weight"]

    @staticmethod
    def normalise(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) \
            or torch.finfo(torch.float32).eps
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def __init__(self):
        self._fits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def save(self, module, x, out):
        x_hat = self.normalise(x.detach(), module)
        fits = self._fits.get(module)
        if fits is None:  # asked once per module (its class's forward does not change between batches)
            expected = module.weight.detach() * x_hat
            # The same operations in the same dtype give the same values; within 1e-4 allows another order of them.
            fits = self._fits[module] = bool(torch.allclose(out.detach().float(), expected.float(), rtol=1e-4,
                                                            atol=1e-6))
        return (x_hat, None) if fits else None

    def accumulate(self, module, saved, G, acc):
        x_hat, G = saved[0], G.to(acc["weight"].dtype)
        B = x_hat.shape[0]
        acc["weight"].add_((G * x_hat.to(G.dtype)).reshape(B, -1, x_hat.shape[-1]).sum(1).square().sum(0))


class Conv2dRule(LayerRule):
    """Conv2d (groups 1, zero padding — ViT's patch embedding): the input unfolded into patches, then as Linear."""

    name = "conv2d"

    def matches(self, module):
        return own_type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str)

    def accumulate(self, module, saved, G, acc):
        G = G.to(acc["weight"].dtype)
        x = saved[0].to(G.dtype)
        B = x.shape[0]
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        G = G.reshape(B, G.shape[1], -1)  # (B, out, L)
        weight = acc["weight"]
        linear_squares(cols.transpose(1, 2), G.transpose(1, 2), weight.view(weight.shape[0], -1), acc.get("bias"))


#: Every closed form, asked in order; a module none of them matches is recomputed alone per example.
RULES: tuple[LayerRule, ...] = (LinearRule(), Conv1DRule(), EmbeddingRule(), LayerNormRule(), RMSNormRule(),
                                Conv2dRule())


def rule_for(module: nn.Module) -> LayerRule | None:
    """The closed form that fits ``module``, or None (recompute it)."""
    return next((rule for rule in RULES if rule.matches(module)), None)
