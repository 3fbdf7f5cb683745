"""Diagonal Fisher (Hessian) estimates: exact per-example squared gradients of each example's log-likelihood,
computed in batches; what an example's log-likelihood is comes from its kind of model (:mod:`gradmatch.kinds`).

`estimate_fisher` is the pure computation; `run_fisher` loads a model and a data split, runs it
(data-parallel under torchrun) and writes ``OUT/hessian/``, the layout of the original code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gradmatch.config.fisher import ESTIMATORS
from gradmatch.errors import UserError
from gradmatch.kinds._classifier import example_uniform, sample_labels  # noqa: F401 - part of this module's API
from gradmatch.kinds.base import INDEX_KEY, LABEL_KEYS

#: Largest block of per-example gradients (elements) formed at once. On CPUs an 8 MB block stays in cache
#: between the matmul that writes it and the squaring that reads it (measured about 2x faster than one
#: block per batch for MiniLM's feed-forward layers, and fewer, larger operations than one example at a
#: time); GPUs want large blocks.
_MAX_BLOCK_CPU = 1 << 21
_MAX_BLOCK_GPU = 1 << 25


# --------------------------------------------------------------------------- per-example squared gradients


def _max_block(t: torch.Tensor) -> int:
    return _MAX_BLOCK_GPU if t.is_cuda else _MAX_BLOCK_CPU


def _sum_of_squares(per_example: torch.Tensor) -> torch.Tensor:
    """Σ_b x_b² over the first dimension. On GPUs a norm reads the block once (memory-bound there);
    on CPUs squaring in place and summing is faster."""
    if per_example.is_cuda:
        return torch.linalg.vector_norm(per_example, dim=0).square_()
    return per_example.square_().sum(0)


def _linear_sq(A: torch.Tensor, G: torch.Tensor, weight_acc: torch.Tensor | None, bias_acc: torch.Tensor | None) -> None:
    """Add Σ_b (G_bᵀ A_b)² to ``weight_acc`` (and Σ_b (Σ_t G_bt)² to ``bias_acc``).

    A: (B, ..., in) layer inputs, G: (B, ..., out) gradients of the layer outputs.
    """
    B = A.shape[0]
    if A.dim() == 2:
        # One token per example: the per-example gradient is an outer product, its square one too.
        if weight_acc is not None:
            weight_acc.add_(torch.mm(G.square().t(), A.square()))
        if bias_acc is not None:
            bias_acc.add_(G.square().sum(0))
        return
    A = A.reshape(B, -1, A.shape[-1])
    G = G.reshape(B, -1, G.shape[-1])
    if bias_acc is not None:
        bias_acc.add_(G.sum(1).square().sum(0))
    if weight_acc is None:
        return
    step = max(1, _max_block(A) // weight_acc.numel())
    for start in range(0, B, step):
        per_example = torch.bmm(G[start:start + step].transpose(1, 2), A[start:start + step])  # (b, out, in)
        weight_acc.add_(_sum_of_squares(per_example))


def _embedding_sq(ids: torch.Tensor, G: torch.Tensor, num_rows: int, padding_idx: int | None,
                  acc: torch.Tensor) -> None:
    """Scatter each example's output gradients into the rows it touches, square, and add to ``acc``."""
    B = ids.shape[0]
    dim = G.shape[-1]
    ids = ids.reshape(B, -1)
    G = G.reshape(B, -1, dim)
    keys = torch.arange(B, device=ids.device).unsqueeze(1) * num_rows + ids
    keys, G = keys.reshape(-1), G.reshape(-1, dim)
    if padding_idx is not None:  # PyTorch never updates the padding row
        keep = ids.reshape(-1) != padding_idx
        keys, G = keys[keep], G[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    per_example_rows = torch.zeros(unique.numel(), dim, dtype=G.dtype, device=G.device).index_add_(0, inverse, G)
    acc.index_add_(0, unique % num_rows, per_example_rows.square_())


def _layer_norm_sq(x: torch.Tensor, G: torch.Tensor, module: nn.LayerNorm, weight_acc, bias_acc) -> None:
    """LayerNorm: per-example gradients are token sums of G·x̂ (weight) and G (bias)."""
    B = x.shape[0]
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)  # (x − mean) / sqrt(var + eps)
    shape = (B, -1, *module.normalized_shape)
    if weight_acc is not None:
        weight_acc.add_((G * x_hat).reshape(shape).sum(1).square().sum(0))
    if bias_acc is not None:
        bias_acc.add_(G.reshape(shape).sum(1).square().sum(0))


def _rms_normalise(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x̂ = x / sqrt(mean(x²) + eps) over the last dimension, in float32 (as Llama-type RMSNorms compute it)."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or torch.finfo(torch.float32).eps
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_sq(x_hat: torch.Tensor, G: torch.Tensor, weight_acc: torch.Tensor) -> None:
    """RMSNorm y = w·x̂: per-example gradients are token sums of G·x̂."""
    B = x_hat.shape[0]
    weight_acc.add_((G * x_hat.to(G.dtype)).reshape(B, -1, x_hat.shape[-1]).sum(1).square().sum(0))


def _conv2d_sq(x: torch.Tensor, G: torch.Tensor, module: nn.Conv2d, weight_acc, bias_acc) -> None:
    """Conv2d (groups 1, zero padding): unfold the input into patches, then as a Linear layer."""
    B = x.shape[0]
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    G = G.reshape(B, G.shape[1], -1)  # (B, out, L)
    flat = weight_acc.view(weight_acc.shape[0], -1)
    _linear_sq(cols.transpose(1, 2), G.transpose(1, 2), flat, bias_acc)


def _conv2d_supported(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _embedding_supported(m: nn.Embedding) -> bool:
    return m.max_norm is None and not m.scale_grad_by_freq and not m.sparse


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x·W + b with W of shape (in, out) — a Linear layer with W transposed."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2 and m.weight.shape[1] == m.nf


def _is_rms_norm(m: nn.Module) -> bool:
    own = [n for n, _ in m.named_parameters(recurse=False)]
    return type(m).__name__.endswith("RMSNorm") and own == ["weight"]


# ------------------------------------------------------- per-example gradients of a shared matrix, by rows


def _rows_linear(A: torch.Tensor, G: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of each example's gradient of a Linear weight (out, in): G_b[:, rows]ᵀ A_b."""
    B = A.shape[0]
    A = A.reshape(B, -1, A.shape[-1])
    G = G.reshape(B, -1, G.shape[-1])
    return torch.bmm(G[:, :, rows].transpose(1, 2), A)


def _rows_conv1d(A: torch.Tensor, G: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of each example's gradient of a Conv1D weight (in, out): A_b[:, rows]ᵀ G_b."""
    B = A.shape[0]
    A = A.reshape(B, -1, A.shape[-1])
    G = G.reshape(B, -1, G.shape[-1])
    return torch.bmm(A[:, :, rows].transpose(1, 2), G)


def _rows_embedding(ids: torch.Tensor, G: torch.Tensor, rows: slice, padding_idx: int | None) -> torch.Tensor:
    """Rows ``rows`` of each example's gradient of an embedding matrix: its output gradients scattered to its ids."""
    B, dim = ids.shape[0], G.shape[-1]
    ids = ids.reshape(B, -1)
    G = G.reshape(B, -1, dim)
    inside = (ids >= rows.start) & (ids < rows.stop)
    if padding_idx is not None:
        inside &= ids != padding_idx
    out = torch.zeros(B, rows.stop - rows.start, dim, dtype=G.dtype, device=G.device)
    b, t = inside.nonzero(as_tuple=True)
    flat = out.view(-1, dim)
    flat.index_add_(0, b * (rows.stop - rows.start) + (ids[b, t] - rows.start), G[b, t])
    return out


_ROW_FUNCTIONS = {"linear": _rows_linear, "conv1d": _rows_conv1d}


# --------------------------------------------------------------------------- the accumulator


class FisherAccumulator:
    """Sums of exact per-example squared gradients of each example's log-likelihood over every parameter.

    ``add(batch)`` processes one batch; ``sums`` (float32, per parameter name) and ``count`` hold the
    running totals, ``mean()`` the estimate. The log-likelihood of an example comes from ``kind`` (default:
    the kind of ``model.config``): log p(y|x) for classifiers, Σ_i log p(x_i | x_<i) over a sequence's
    predicted tokens for causal LMs. Linear, transformers' Conv1D, Embedding, LayerNorm, RMSNorm and Conv2d
    layers get closed-form per-example gradients from hooks (one forward, one backward without weight
    gradients); a matrix shared by two layers (tied input embedding and output head) sums each example's
    gradients over its uses before squaring, by blocks of rows; any other module that owns parameters is
    handled exactly by recomputing that module alone and back-propagating each example's output gradient.
    """

    def __init__(self, model: nn.Module, *, kind=None, estimator: str = "sampled", seed: int = 0):
        if estimator not in ESTIMATORS:
            raise UserError(f"unknown Fisher estimator {estimator!r} (choose {' or '.join(ESTIMATORS)})")
        if kind is None:
            from gradmatch.kinds import kind_of_config

            kind = kind_of_config(getattr(model, "config", None))
        self.model, self.kind, self.estimator, self.seed = model, kind, estimator, int(seed)
        self.count = 0
        canonical = {}  # id(parameter) -> its name (the first one named_parameters gives a shared tensor)
        for name, p in model.named_parameters():
            canonical.setdefault(id(p), name)
        self.sums: dict[str, torch.Tensor] = {
            name: torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device) for name, p in model.named_parameters()
        }
        self._owner: dict[nn.Module, list[tuple[str, str]]] = {}  # module -> [(attribute, parameter name)]
        uses: dict[str, list[nn.Module]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            direct = [(attr, canonical[id(p)]) for attr, p in module.named_parameters(recurse=False)]
            if direct and module not in self._owner:
                self._owner[module] = direct
                for _, full in direct:
                    uses.setdefault(full, []).append(module)
        self._shared = {name for name, mods in uses.items() if len(mods) > 1}
        for name in sorted(self._shared):
            for module in uses[name]:
                attr = next(a for a, full in self._owner[module] if full == name)
                if attr != "weight" or self._kind(module) not in ("linear", "conv1d", "embedding"):
                    raise UserError(f"parameter {name} is shared with {type(module).__name__}.{attr}: exact per-example "
                                    "Fisher of a shared parameter is supported for weights of Linear, Conv1D and "
                                    "Embedding layers (tied embeddings) only")
        self._handles = []
        self._batch_size = 0
        self._calls: dict[nn.Module, int] = {}
        self._leaves: list[torch.Tensor] = []
        self._deferred: list[tuple] = []
        self._shared_uses: dict[str, list[tuple]] = {}
        self._suspended = False

    # ------------------------------------------------------------------ hooks

    def _kind(self, module: nn.Module) -> str:
        t = type(module)
        if t is nn.Linear:
            return "linear"
        if _is_hf_conv1d(module):
            return "conv1d"
        if t is nn.Embedding and _embedding_supported(module):
            return "embedding"
        if t is nn.LayerNorm:
            return "layernorm"
        if _is_rms_norm(module):
            return "rmsnorm"
        if t is nn.Conv2d and _conv2d_supported(module):
            return "conv2d"
        return "generic"

    def _install(self) -> None:
        for module in self._owner:
            kind = self._kind(module)
            self._handles.append(module.register_forward_hook(
                lambda m, args, kwargs, out, kind=kind: self._on_forward(m, kind, args, kwargs, out),
                with_kwargs=True))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _name(self, module: nn.Module) -> str:
        return self._owner[module][0][1].rsplit(".", 1)[0]

    def _on_forward(self, module, kind, args, kwargs, out):
        if self._suspended:
            return None
        self._calls[module] = self._calls.get(module, 0) + 1
        if self._calls[module] > 1:
            raise UserError(f"module {self._name(module)} runs more than once per forward pass (shared weights): "
                            "exact per-example Fisher is not supported for it")
        if not isinstance(out, torch.Tensor):
            raise UserError(f"module {self._name(module)} ({type(module).__name__}) owns parameters but does not "
                            "return one tensor: exact per-example Fisher is not supported for it")
        B = self._batch_size
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if kind != "generic" and not isinstance(x, torch.Tensor):
            kind = "generic"  # called without a tensor input: recompute it instead
        if kind == "embedding" and x.shape[0] == 1 and B > 1:
            # A row shared by the batch (BERT's and GPT-2's position ids): give each example its own copy so
            # its output gradient stays per example.
            x = x.expand(B, *x.shape[1:])
            out = out.expand(B, *out.shape[1:])
        if out.shape[0] != B or (kind != "generic" and x.shape[0] != B):
            raise UserError(f"module {self._name(module)} does not keep the batch in its first dimension: "
                            "exact per-example Fisher is not supported for it")
        saved: tuple
        if kind == "rmsnorm":
            x_hat = _rms_normalise(x.detach(), module)
            if torch.allclose(out.detach().float(), module.weight.detach().float() * x_hat, rtol=1e-4, atol=1e-6):
                saved = (x_hat, None)
            else:  # another RMSNorm formula (e.g. (1 + w)·x̂): recompute it instead
                kind = "generic"
        if not out.requires_grad:
            out = out.detach().requires_grad_()
            self._leaves.append(out)
        if kind == "generic":
            saved = (_detach_tree(args), _detach_tree(kwargs))
        elif kind != "rmsnorm":
            saved = (x.detach(), x._version)
        out.register_hook(lambda g: self._on_backward(module, kind, saved, g))
        return out

    def _on_backward(self, module, kind, saved, G) -> None:
        if kind == "generic":
            self._deferred.append((module, saved, G.detach()))
            return
        x, version = saved
        if version is not None and x._version != version:
            raise UserError(f"the input of {self._name(module)} was modified in place after its forward; "
                            "cannot form per-example gradients")
        acc = {attr: self.sums[full] for attr, full in self._owner[module]}
        shared = {attr for attr, full in self._owner[module] if full in self._shared}
        dtype = next(iter(acc.values())).dtype
        G = G.detach().to(dtype)
        if shared:  # the weight's per-example gradient is summed over its uses before squaring (_finish_shared)
            full = dict(self._owner[module])["weight"]
            self._shared_uses.setdefault(full, []).append((kind, module, x if kind == "embedding" else x.to(dtype), G))
        weight = None if "weight" in shared else acc.get("weight")
        if kind == "embedding":
            if weight is not None:
                _embedding_sq(x, G, module.num_embeddings, module.padding_idx, weight)
        elif kind == "linear":
            _linear_sq(x.to(dtype), G, weight, acc.get("bias"))
        elif kind == "conv1d":
            _linear_sq(x.to(dtype), G, None if weight is None else weight.t(), acc.get("bias"))
        elif kind == "layernorm":
            _layer_norm_sq(x.to(dtype), G, module, acc.get("weight"), acc.get("bias"))
        elif kind == "rmsnorm":
            _rms_norm_sq(x, G, acc["weight"])
        elif kind == "conv2d":
            _conv2d_sq(x.to(dtype), G, module, acc["weight"], acc.get("bias"))

    def _finish_shared(self) -> None:
        """Each shared matrix: per example, the sum of its uses' gradients, squared — by blocks of rows."""
        for full, uses in self._shared_uses.items():
            acc = self.sums[full]
            B = uses[0][3].shape[0]
            row_numel = max(1, acc.numel() // acc.shape[0])
            step = max(1, _max_block(acc) // (B * row_numel))
            for start in range(0, acc.shape[0], step):
                rows = slice(start, min(start + step, acc.shape[0]))
                per_example = None
                for kind, module, x, G in uses:
                    if kind == "embedding":
                        part = _rows_embedding(x, G, rows, module.padding_idx)
                    else:
                        part = _ROW_FUNCTIONS[kind](x, G, rows)
                    per_example = part if per_example is None else per_example.add_(part)
                acc[rows].add_(_sum_of_squares(per_example))
        self._shared_uses.clear()

    def _run_deferred(self) -> None:
        """Modules without a closed form: recompute each alone, back-propagate example by example."""
        for module, (args, kwargs), G in self._deferred:
            owned = self._owner[module]
            params = [getattr(module, attr) for attr, _ in owned]
            flags = [p.requires_grad for p in params]
            self._suspended = True
            try:
                with torch.enable_grad():
                    for p in params:
                        p.requires_grad_(True)
                    out = module(*args, **kwargs)
                    for b in range(G.shape[0]):
                        g_b = torch.zeros_like(G)
                        g_b[b] = G[b]
                        grads = torch.autograd.grad(out, params, g_b.to(out.dtype), retain_graph=True,
                                                    allow_unused=True)
                        for (attr, full), g in zip(owned, grads):
                            if g is not None:
                                self.sums[full].add_(g.to(self.sums[full].dtype).square())
            finally:
                self._suspended = False
                for p, flag in zip(params, flags):
                    p.requires_grad_(flag)
        self._deferred.clear()

    # ------------------------------------------------------------------ one batch

    def add(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Accumulate one batch; returns its number of examples.

        ``batch`` holds the model's inputs, ``labels`` (needed by ``empirical`` classifiers; next-token
        targets of causal LMs) and optionally ``index``, the examples' positions in the data set (they
        seed the sampled labels; by default the running count).
        """
        B = self.kind.batch_size(batch)
        if B == 0:
            return 0
        index = batch.get(INDEX_KEY)
        index = list(range(self.count, self.count + B)) if index is None else [int(i) for i in index]
        self._batch_size, self._calls, self._leaves, self._shared_uses = B, {}, [], {}
        total = self.kind.log_likelihood(self.model, batch, estimator=self.estimator, seed=self.seed, index=index)
        if self._leaves:
            torch.autograd.grad(total, self._leaves, allow_unused=True)
        self._leaves = []
        self._finish_shared()
        self._run_deferred()
        self.count += B
        return B

    @contextlib.contextmanager
    def attached(self):
        """Eval mode, parameters frozen (no weight gradients are formed), hooks installed; all undone after."""
        model = self.model
        was_training = model.training
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._install()
        try:
            yield self
        finally:
            self._remove()
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
            model.train(was_training)

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise UserError("no examples: the Fisher estimate needs at least one")
        return {name: s / self.count for name, s in self.sums.items()}


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    """Sums are float32, or float64 for a float64 model."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _detach_tree(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach_tree(o) for o in obj)
    if isinstance(obj, list):
        return [_detach_tree(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach_tree(v) for k, v in obj.items()}
    return obj


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", desc="fisher", disable=not enabled, dynamic_ncols=True)


def estimate_fisher(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, kind=None,
                    estimator: str = "sampled", seed: int = 0, progress: bool = True,
                    total: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model``: the mean over examples of squared per-example gradients of their
    log-likelihood (see :class:`FisherAccumulator`).

    ``estimator`` ``sampled`` draws y (each next token, for a causal LM) from the model's predictive
    distribution, seeded per example by ``(seed, index)``; ``empirical`` uses the data's own. The model
    runs in eval mode. Returns float32 tensors keyed by parameter name (``model.named_parameters()``).
    """
    acc = FisherAccumulator(model, kind=kind, estimator=estimator, seed=seed)
    with acc.attached(), _progress(total, progress) as bar:
        for batch in batches:
            bar.update(acc.add(batch))
    return acc.mean()


def _one_example(batch: Mapping[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Example ``b`` of a padded batch, cut to its own length (``attention_mask``) when it has one."""
    one = {k: v[b:b + 1] for k, v in batch.items() if isinstance(v, torch.Tensor) and k != INDEX_KEY and v.dim() > 0}
    one.update({k: v[b:b + 1] for k, v in batch.items() if k in LABEL_KEYS and isinstance(v, torch.Tensor)
                and v.dim() == 1})
    if "attention_mask" in one:
        n = int(one["attention_mask"].sum())
        one = {k: v[:, :n] if v.dim() == 2 and k != "label" and (k != "labels" or v.shape[1] >= n) else v
               for k, v in one.items()}
    return one


def estimate_fisher_reference(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, kind=None,
                              estimator: str = "sampled", seed: int = 0) -> dict[str, torch.Tensor]:
    """The original's method, for tests and benchmarks: one example at a time, square its full gradient.

    Each example of each batch is cut to its own length (``attention_mask``) and run alone; its
    log-likelihood is the kind's, with the same per-example seeds as the batched estimate.
    """
    if kind is None:
        from gradmatch.kinds import kind_of_config

        kind = kind_of_config(getattr(model, "config", None))
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device) for name, p in params.items()}
    count = 0
    try:
        for batch in batches:
            B = kind.batch_size(batch)
            index = batch.get(INDEX_KEY, torch.arange(count, count + B))
            for b in range(B):
                total = kind.log_likelihood(model, _one_example(batch, b), estimator=estimator, seed=seed,
                                            index=[int(index[b])])
                grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
                for name, g in zip(params, grads):
                    if g is not None:
                        sums[name].add_(g.to(sums[name].dtype).square())
                count += 1
    finally:
        model.train(was_training)
    return {name: s / count for name, s in sums.items()}


# --------------------------------------------------------------------------- files: OUT/hessian/


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict: every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _distributed(use_cuda: bool) -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group) under torchrun; (0, 1, False) otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    started = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        started = True
    return dist.get_rank(), dist.get_world_size(), started


@contextlib.contextmanager
def distributed_run(device: str | None):
    """Under torchrun, join the process group (starting it if nobody has) and yield (rank, world size, this
    process's device: its GPU where the device is unset or plain ``cuda``); alone, (0, 1, device or the default).
    When the block succeeds every rank meets at a barrier (rank 0 has written the output); a group this started
    is destroyed however the block ends."""
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    rank, world, started = _distributed(use_cuda)
    try:
        if device is None or (world > 1 and device == "cuda"):
            device = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"
        yield rank, world, device
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _batches(encoded, collate, indices: list[int], batch_size: int):
    columns = [c for c in encoded.column_names if c not in ("text", "image")]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        rows = encoded[chunk]
        features = [{c: rows[c][j] for c in columns} for j in range(len(chunk))]
        batch = dict(collate(features))
        batch[INDEX_KEY] = torch.tensor(chunk, dtype=torch.long)
        yield batch


def write_hessian(model: nn.Module, fisher: Mapping[str, torch.Tensor], folder: Path, metadata: dict) -> None:
    """Write ``folder`` as a Hugging Face model folder whose parameters hold ``fisher`` (float32), plus
    ``fisher.json``. Float buffers in the state dict (e.g. BatchNorm statistics) are written as zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = fisher[name].detach().to(device="cpu", dtype=torch.float32)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.data = torch.zeros(b.shape, dtype=torch.float32)
    model.to("cpu").save_pretrained(folder)
    (folder / "fisher.json").write_text(json.dumps(metadata, indent=2) + "\n")


def check_statistics_arguments(model, data, out, *, overwrite: bool, batch_size: int, max_length: int,
                               max_examples: int | None, device: str | None, seed: int | None = None) -> Path:
    """The checks `gradmatch fisher` and `gradmatch gram` make before reading anything: sizes at least 1, a seed
    numpy takes (0 <= seed < 2**32), a known device, an output folder that may be written and is none of the
    inputs. Returns the output folder."""
    from gradmatch.config import check_seed
    from gradmatch.fsutil import check_not_input, check_output_dir

    if seed is not None:
        check_seed(seed, "--seed")
    for flag, value in (("--batch-size", batch_size), ("--max-length", max_length)):
        if int(value) < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if max_examples is not None and int(max_examples) < 1:
        raise UserError(f"--max-examples must be at least 1 (got {max_examples})")
    if device is not None:
        from gradmatch.devices import parse_device

        parse_device(device)
    out = check_output_dir(out, overwrite)
    check_not_input(out, {"the model": str(model), "the data": str(data)}, "--out")
    return out


#: What to do instead of a Fisher of a pretrained model without a likelihood of its own (no classification or LM head).
_NO_HEAD = ("as the H_0 of a merge from this pretrained base, set `base_hessian: prior` in the merge config (an "
            "isotropic prior, docs/merge.md \"Merging from a pretrained base\"), or fine-tune it first")


def run_fisher(model: str, data: str, split: str, *, out: str | os.PathLike, estimator: str = "sampled",
               batch_size: int = 16, max_examples: int | None = None, max_length: int = 128, seed: int = 0,
               data_dir: str | os.PathLike | None = None, overwrite: bool = False, config_name: str | None = None,
               device: str | None = None, progress: bool = True, kind: str | None = None,
               filters: Mapping[str, object] | None = None) -> Path:
    """Estimate the Fisher of ``model`` on ``data``/``split`` and write ``OUT/hessian/`` (atomically).

    ``kind`` overrides the kind of model read from its config; ``filters`` keeps only some rows
    (e.g. ``{"label": 0}``; see :func:`gradmatch.data.load_split`).

    Under torchrun the examples are shared out across processes (gloo on CPU, nccl on GPU), the sums
    all-reduced, and rank 0 writes; the result equals one process's. Returns ``out``.
    """
    from gradmatch import __version__
    from gradmatch.fsutil import atomic_dir

    if estimator not in ESTIMATORS:
        raise UserError(f"unknown Fisher estimator {estimator!r} (choose {' or '.join(ESTIMATORS)})")
    out = check_statistics_arguments(model, data, out, overwrite=overwrite, batch_size=batch_size,
                                     max_length=max_length, max_examples=max_examples, device=device, seed=seed)

    from gradmatch.data import load_split
    from gradmatch.checkpoints import folder_fingerprint
    from gradmatch.models import BUILTIN_SPECS, kind_of, load_config, load_model, model_max_length, resolve_model

    # Everything the user can get wrong is checked before the weights load (and before any output).
    name = str(model)
    config = load_config(name)
    model_kind = kind_of(name, kind)
    if name not in BUILTIN_SPECS:
        model_kind.check_head(name, config, "the Fisher", _NO_HEAD)
    dataset = load_split(data, split, config_name=config_name, data_dir=data_dir, filters=filters)
    model_kind.check_data(dataset, f"{data} ({split})", name)
    if model_kind.needs_labels:
        model_kind.check_labels(dataset, f"{data} ({split})", int(config.num_labels))
    if max_examples is not None and len(dataset) > int(max_examples):
        dataset = dataset.select(range(int(max_examples)))
    net, processor = load_model(name, kind=model_kind)
    length = model_max_length(net, max_length)
    with distributed_run(device) as (rank, world, device):
        encoded = model_kind.encode(dataset, processor, length)
        fingerprint = model_fingerprint(net) if rank == 0 else None
        source = Path(resolve_model(name)) if name not in BUILTIN_SPECS else None
        weights = folder_fingerprint(source) if rank == 0 and source is not None and source.is_dir() else None
        net.to(device)
        indices = list(range(rank, len(encoded), world))
        acc = FisherAccumulator(net, kind=model_kind, estimator=estimator, seed=seed)
        with acc.attached(), _progress(len(indices), progress and rank == 0) as bar:  # rank 0's share
            for batch in _batches(encoded, model_kind.collator(processor), indices, int(batch_size)):
                bar.update(acc.add(batch))
        if world > 1:
            import torch.distributed as dist

            count = torch.tensor([acc.count], dtype=torch.float64, device=device)
            dist.all_reduce(count)
            acc.count = int(count.item())
            for s in acc.sums.values():
                dist.all_reduce(s)
        fisher = acc.mean()
        if rank == 0:
            metadata = {
                "estimator": estimator, "num_examples": acc.count, "dataset": str(data), "split": str(split),
                "config_name": config_name, "filters": dict(filters) if filters else None, "seed": int(seed),
                "max_length": length, "model": name, "kind": model_kind.name,
                "model_fingerprint": fingerprint, "weights_fingerprint": weights, "num_processes": world,
                "quantity": f"mean over {model_kind.unit}s of squared per-{model_kind.unit} gradients of "
                            f"{model_kind.likelihood}",
                "gradmatch_version": __version__,
            }
            with atomic_dir(out, overwrite) as tmp:
                write_hessian(net, fisher, tmp / "hessian", metadata)
    return Path(out)
