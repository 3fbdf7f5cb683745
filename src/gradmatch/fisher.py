"""Diagonal Fisher (Hessian) estimates: exact per-example squared gradients of log p(y|x), computed in batches.

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

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradmatch.errors import UserError

from gradmatch.config.fisher import ESTIMATORS  # noqa: E402 - the names, declared once

#: Keys of a batch that are not model inputs.
_LABEL_KEYS = ("labels", "label")
_INDEX_KEY = "index"

#: Largest block of per-example gradients (elements) formed at once. On CPUs an 8 MB block stays in cache
#: between the matmul that writes it and the squaring that reads it (measured about 2x faster than one
#: block per batch for MiniLM's feed-forward layers, and fewer, larger operations than one example at a
#: time); GPUs want large blocks.
_MAX_BLOCK_CPU = 1 << 21
_MAX_BLOCK_GPU = 1 << 25


# --------------------------------------------------------------------------- label sampling


def example_uniform(seed: int, index: int) -> float:
    """The uniform number in [0, 1) that decides example ``index``'s sampled label under ``seed``.

    It depends only on (seed, index), never on the batch size, the batch order or the number of processes.
    """
    return float(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).random())


def sample_labels(logits: torch.Tensor, indices: Iterable[int], seed: int) -> torch.Tensor:
    """Draw y_b ~ softmax(logits_b) by inverse CDF with each example's own uniform number."""
    probs = torch.softmax(logits.detach().to(device="cpu", dtype=torch.float64), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.tensor([example_uniform(seed, i) for i in indices], dtype=torch.float64).unsqueeze(1)
    labels = (cdf <= u).sum(-1).clamp_(max=probs.shape[-1] - 1)
    return labels.to(logits.device)


# --------------------------------------------------------------------------- per-example squared gradients


def _sum_of_squares(per_example: torch.Tensor) -> torch.Tensor:
    """Σ_b x_b² over the first dimension. On GPUs a norm reads the block once (memory-bound there);
    on CPUs squaring in place and summing is faster."""
    if per_example.is_cuda:
        return torch.linalg.vector_norm(per_example, dim=0).square_()
    return per_example.square_().sum(0)


def _linear_sq(A: torch.Tensor, G: torch.Tensor, weight_acc: torch.Tensor, bias_acc: torch.Tensor | None) -> None:
    """Add Σ_b (G_bᵀ A_b)² to ``weight_acc`` (and Σ_b (Σ_t G_bt)² to ``bias_acc``).

    A: (B, ..., in) layer inputs, G: (B, ..., out) gradients of the layer outputs.
    """
    B = A.shape[0]
    if A.dim() == 2:
        # One token per example: the per-example gradient is an outer product, its square one too.
        weight_acc.add_(torch.mm(G.square().t(), A.square()))
        if bias_acc is not None:
            bias_acc.add_(G.square().sum(0))
        return
    A = A.reshape(B, -1, A.shape[-1])
    G = G.reshape(B, -1, G.shape[-1])
    if bias_acc is not None:
        bias_acc.add_(G.sum(1).square().sum(0))
    step = max(1, (_MAX_BLOCK_GPU if A.is_cuda else _MAX_BLOCK_CPU) // weight_acc.numel())
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


# --------------------------------------------------------------------------- the accumulator


class FisherAccumulator:
    """Sums of exact per-example squared gradients of log p(y|x) over every parameter of ``model``.

    ``add(batch)`` processes one batch; ``sums`` (float32, per parameter name) and ``count`` hold the
    running totals, ``mean()`` the estimate. Linear, Embedding, LayerNorm and Conv2d layers get
    closed-form per-example gradients from hooks (one forward, one backward without weight
    gradients); any other module that owns parameters is handled exactly by recomputing that module
    alone and back-propagating each example's output gradient through it.
    """

    def __init__(self, model: nn.Module, *, estimator: str = "sampled", seed: int = 0):
        if estimator not in ESTIMATORS:
            raise UserError(f"unknown Fisher estimator {estimator!r} (choose sampled or empirical)")
        self.model, self.estimator, self.seed = model, estimator, int(seed)
        self.count = 0
        self._check_unshared()
        self.sums: dict[str, torch.Tensor] = {
            name: torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device) for name, p in model.named_parameters()
        }
        self._owner = {}  # module -> [(attribute name, full name)]
        for mod_name, module in model.named_modules():
            direct = [(attr, f"{mod_name}.{attr}" if mod_name else attr)
                      for attr, _ in module.named_parameters(recurse=False)]
            if direct:
                self._owner[module] = direct
        self._handles = []
        self._batch_size = 0
        self._calls: dict[nn.Module, int] = {}
        self._leaves: list[torch.Tensor] = []
        self._deferred: list[tuple] = []
        self._suspended = False

    # ------------------------------------------------------------------ hooks

    def _check_unshared(self) -> None:
        seen: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                raise UserError(f"parameters {seen[id(p)]} and {name} are the same tensor (tied weights): "
                                "exact per-example Fisher of shared parameters is not supported")
            seen[id(p)] = name

    def _kind(self, module: nn.Module) -> str:
        t = type(module)
        if t is nn.Linear:
            return "linear"
        if t is nn.Embedding and _embedding_supported(module):
            return "embedding"
        if t is nn.LayerNorm:
            return "layernorm"
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
            # A row shared by the batch (BERT's position ids): give each example its own copy so its
            # output gradient stays per example.
            x = x.expand(B, *x.shape[1:])
            out = out.expand(B, *out.shape[1:])
        if out.shape[0] != B or (kind != "generic" and x.shape[0] != B):
            raise UserError(f"module {self._name(module)} does not keep the batch in its first dimension: "
                            "exact per-example Fisher is not supported for it")
        if not out.requires_grad:
            out = out.detach().requires_grad_()
            self._leaves.append(out)
        if kind == "generic":
            saved = (_detach_tree(args), _detach_tree(kwargs))
        else:
            saved = (x.detach(), x._version)
        out.register_hook(lambda g: self._on_backward(module, kind, saved, g))
        return out

    def _on_backward(self, module, kind, saved, G) -> None:
        if kind == "generic":
            self._deferred.append((module, saved, G.detach()))
            return
        x, version = saved
        if x._version != version:
            raise UserError(f"the input of {self._name(module)} was modified in place after its forward; "
                            "cannot form per-example gradients")
        acc = {attr: self.sums[full] for attr, full in self._owner[module]}
        dtype = next(iter(acc.values())).dtype
        G = G.detach().to(dtype)
        if kind == "embedding":
            _embedding_sq(x, G, module.num_embeddings, module.padding_idx, acc["weight"])
        elif kind == "linear":
            _linear_sq(x.to(dtype), G, acc["weight"], acc.get("bias"))
        elif kind == "layernorm":
            _layer_norm_sq(x.to(dtype), G, module, acc.get("weight"), acc.get("bias"))
        elif kind == "conv2d":
            _conv2d_sq(x.to(dtype), G, module, acc["weight"], acc.get("bias"))

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

        ``batch`` holds the model's inputs, ``labels`` (needed by ``empirical``) and optionally
        ``index``, the examples' positions in the data set (they seed the sampled labels; by
        default the running count).
        """
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k not in _LABEL_KEYS and k != _INDEX_KEY}
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        first = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
        B = first.shape[0]
        if B == 0:
            return 0
        index = batch.get(_INDEX_KEY)
        index = list(range(self.count, self.count + B)) if index is None else [int(i) for i in index]
        self._batch_size, self._calls, self._leaves = B, {}, []
        logits = self.model(**inputs).logits
        if logits.dim() != 2 or logits.shape[0] != B:
            raise UserError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, classes)")
        num_classes = logits.shape[1]
        if self.estimator == "empirical":
            if labels is None:
                raise UserError("the empirical Fisher needs labels; the data has none")
            y = torch.as_tensor(labels).to(device=device, dtype=torch.long).reshape(-1)
            bad = (y < 0) | (y >= num_classes)
            if bool(bad.any()):
                raise UserError(f"label {int(y[bad][0])} is outside the model's {num_classes} classes")
        else:
            y = sample_labels(logits, index, self.seed)
        log_p = torch.log_softmax(logits.to(_acc_dtype(logits)), dim=-1).gather(1, y.unsqueeze(1)).sum()
        torch.autograd.grad(log_p, self._leaves, allow_unused=True)
        self._leaves = []
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


def estimate_fisher(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, estimator: str = "sampled",
                    seed: int = 0, progress: bool = True, total: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model``: the mean over examples of squared per-example gradients of log p(y|x).

    ``estimator`` ``sampled`` draws y from the model's predictive distribution (seeded per example
    by ``(seed, index)``), ``empirical`` uses the batch's ``labels``. The model runs in eval mode.
    Returns float32 tensors keyed by parameter name (``model.named_parameters()``).
    """
    acc = FisherAccumulator(model, estimator=estimator, seed=seed)
    with acc.attached(), _progress(total, progress) as bar:
        for batch in batches:
            bar.update(acc.add(batch))
    return acc.mean()


def estimate_fisher_reference(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                              estimator: str = "sampled", seed: int = 0) -> dict[str, torch.Tensor]:
    """The original's method, for tests and benchmarks: one example at a time, square its full gradient.

    Each example of each batch is cut to its own length (``attention_mask``) and run alone.
    """
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device) for name, p in params.items()}
    count = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS and k != _INDEX_KEY}
            labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
            B = next(iter(inputs.values())).shape[0]
            index = batch.get(_INDEX_KEY, torch.arange(count, count + B))
            for b in range(B):
                one = {k: v[b:b + 1].to(device) for k, v in inputs.items()}
                if "attention_mask" in one:
                    n = int(one["attention_mask"].sum())
                    one = {k: v[:, :n] if v.dim() == 2 else v for k, v in one.items()}
                logits = model(**one).logits
                logits = logits.to(_acc_dtype(logits))
                if estimator == "empirical":
                    y = torch.as_tensor(labels)[b:b + 1].to(device=device, dtype=torch.long)
                else:
                    y = sample_labels(logits, [int(index[b])], seed)
                log_p = torch.log_softmax(logits, -1)[0, y[0]]
                grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
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


def _check_classification_head(name: str, config) -> None:
    from gradmatch.models import BUILTIN_SPECS

    if name in BUILTIN_SPECS:
        return
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs):
        raise UserError(f"model {name} has no classification head (its architecture is {', '.join(archs)}): "
                        "the Fisher of log p(y|x) needs a trained classifier; fine-tune it first")


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


def _batches(encoded, collate, indices: list[int], batch_size: int):
    columns = [c for c in encoded.column_names if c not in ("text", "image")]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        rows = encoded[chunk]
        features = [{c: rows[c][j] for c in columns} for j in range(len(chunk))]
        batch = dict(collate(features))
        batch[_INDEX_KEY] = torch.tensor(chunk, dtype=torch.long)
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


def run_fisher(model: str, data: str, split: str, *, out: str | os.PathLike, estimator: str = "sampled",
               batch_size: int = 16, max_examples: int | None = None, max_length: int = 128, seed: int = 0,
               data_dir: str | os.PathLike | None = None, overwrite: bool = False, config_name: str | None = None,
               device: str | None = None, progress: bool = True) -> Path:
    """Estimate the Fisher of ``model`` on ``data``/``split`` and write ``OUT/hessian/`` (atomically).

    Under torchrun the examples are shared out across processes (gloo on CPU, nccl on GPU), the sums
    all-reduced, and rank 0 writes; the result equals one process's. Returns ``out``.
    """
    from gradmatch import __version__
    from gradmatch.fsutil import atomic_dir, check_output_dir

    if estimator not in ESTIMATORS:
        raise UserError(f"unknown Fisher estimator {estimator!r} (choose sampled or empirical)")
    for flag, value in (("--batch-size", batch_size), ("--max-length", max_length)):
        if int(value) < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if max_examples is not None and int(max_examples) < 1:
        raise UserError(f"--max-examples must be at least 1 (got {max_examples})")
    if device is not None:
        from gradmatch.devices import parse_device

        parse_device(device)
    out = check_output_dir(out, overwrite)

    from gradmatch import data as gm_data
    from gradmatch.models import is_image_model, load_config, load_for_classification

    # Everything the user can get wrong is checked before the weights load (and before any output).
    name = str(model)
    config = load_config(name)
    _check_classification_head(name, config)
    num_labels = int(config.num_labels)
    dataset = gm_data.load_split(data, split, config_name=config_name, data_dir=data_dir, num_labels=num_labels)
    if max_examples is not None and len(dataset) > int(max_examples):
        dataset = dataset.select(range(int(max_examples)))
    if len(dataset) == 0:
        raise UserError(f"data set {data} split {split} has no examples")
    model_is_image, data_is_image = is_image_model(config), gm_data.split_kind(dataset) == "image"
    if model_is_image != data_is_image:
        raise UserError(f"model {name} is {'an image' if model_is_image else 'a text'} classifier but data set {data} "
                        f"holds {'images' if data_is_image else 'texts'}")
    net, processor = load_for_classification(name)
    if int(net.config.num_labels) != num_labels:  # pragma: no cover - the loader keeps the config's head
        raise UserError(f"model {name}: head has {net.config.num_labels} labels, config {num_labels}")
    length = gm_data.model_max_length(net, max_length)
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    rank, world, started = _distributed(use_cuda)
    try:
        encoded = gm_data.encode(dataset, processor, length)
        if device is None or (world > 1 and device == "cuda"):  # under torchrun: this process's GPU
            device = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"
        fingerprint = model_fingerprint(net) if rank == 0 else None
        net.to(device)
        indices = list(range(rank, len(encoded), world))
        acc = FisherAccumulator(net, estimator=estimator, seed=seed)
        with acc.attached(), _progress(len(indices), progress and rank == 0) as bar:  # rank 0's share
            for batch in _batches(encoded, gm_data.collator(processor), indices, int(batch_size)):
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
                "config_name": config_name, "seed": int(seed), "max_length": length, "model": name,
                "model_fingerprint": fingerprint, "num_processes": world,
                "quantity": "mean over examples of squared per-example gradients of log p(y|x)",
                "gradmatch_version": __version__,
            }
            with atomic_dir(out, overwrite) as tmp:
                write_hessian(net, fisher, tmp / "hessian", metadata)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return Path(out)
