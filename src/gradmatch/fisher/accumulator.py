"""The exact per-example Fisher of a model in batches: :class:`FisherAccumulator` (hooks driven by the layer rules
of :mod:`gradmatch.fisher.layers`, a recompute for any other module), :func:`estimate_fisher` and the original's
one-example-at-a-time method, :func:`estimate_fisher_reference`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
import torch.utils.checkpoint
from torch import nn

from gradmatch.errors import UserError
from gradmatch.fisher.estimators import get_estimator
from gradmatch.fisher.layers import LayerRule, add_squares, max_block, rule_for, sums_dtype
from gradmatch.kinds.base import INDEX_KEY, LABEL_KEYS


def _targets(estimator: str):
    entry = get_estimator(estimator)
    if entry.targets is None:
        raise UserError(f"Hessian estimator {estimator!r} takes its statistics from {entry.source.value}, not "
                        "from a pass over examples")
    return entry.targets


def _kind_of(model, kind):
    if kind is not None:
        return kind
    from gradmatch.kinds import kind_of_config

    return kind_of_config(getattr(model, "config", None))


class FisherAccumulator:
    """Sums of exact per-example squared gradients of each example's log-likelihood over every parameter.

    ``add(batch)`` processes one batch; ``sums`` (float32, per parameter name) and ``count`` hold the
    running totals, ``mean()`` the estimate. The log-likelihood of an example comes from ``kind`` (default:
    the kind of ``model.config``): log p(y|x) for classifiers, Σ_i log p(x_i | x_<i) over a sequence's
    predicted tokens for causal LMs; y comes from the data or the model as the ``estimator``'s entry in
    :data:`gradmatch.fisher.estimators.ESTIMATORS` says. Every layer type with a rule in
    :mod:`gradmatch.fisher.layers` gets closed-form per-example gradients from hooks (one forward, one backward
    without weight gradients); a matrix shared by two layers (tied input embedding and output head) sums each
    example's gradients over its uses before squaring, by blocks of rows; any other module that owns
    parameters is handled exactly by recomputing that module alone and back-propagating each example's
    output gradient.
    """

    def __init__(self, model: nn.Module, *, kind=None, estimator: str = "sampled", seed: int = 0,
                 gradient_checkpointing: bool = False):
        self.targets = _targets(estimator)
        self.checkpointed_layers = checkpoint_layers(model) if gradient_checkpointing else []
        self.model, self.kind, self.estimator, self.seed = model, _kind_of(model, kind), estimator, int(seed)
        self.count = 0
        canonical = {}  # id(parameter) -> its name (the first one named_parameters gives a shared tensor)
        for name, p in model.named_parameters():
            canonical.setdefault(id(p), name)
        self.sums: dict[str, torch.Tensor] = self._allocate(model)
        self._owner: dict[nn.Module, list[tuple[str, str]]] = {}  # module -> [(attribute, parameter name)]
        self._rule: dict[nn.Module, LayerRule | None] = {}
        uses: dict[str, list[nn.Module]] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            direct = [(attr, canonical[id(p)]) for attr, p in module.named_parameters(recurse=False)]
            if direct and module not in self._owner:
                self._owner[module] = direct
                self._rule[module] = rule_for(module)
                for _, full in direct:
                    uses.setdefault(full, []).append(module)
        self._shared = {name for name, mods in uses.items() if len(mods) > 1}
        for name in sorted(self._shared):
            for module in uses[name]:
                attr = next(a for a, full in self._owner[module] if full == name)
                rule = self._rule[module]
                if attr != "weight" or rule is None or not rule.shareable:
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
        self._averaged = False
        self._live = True  # False: a batch run only to keep processes in step (sharded); it adds nothing
        self._recomputing = False
        self._in_checkpoint = False
        self._ran: set[nn.Module] = set()
        self._recomputed: dict[nn.Module, tuple] = {}
        self._waiting: dict[nn.Module, torch.Tensor] = {}

    # ------------------------------------------------------------------ where sums go

    def _allocate(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The float32 sums, one per parameter name (a sharded accumulator holds only its process's rows)."""
        return {name: torch.zeros(p.shape, dtype=sums_dtype(p), device=p.device) for name, p in model.named_parameters()}

    def _targets_of(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """attribute -> the tensor a layer rule adds this batch's Σ_b g_b² into (here: the sums themselves)."""
        return {attr: self.sums[full] for attr, full in self._owner[module]}

    def _commit(self, module: nn.Module, targets: dict[str, torch.Tensor | None]) -> None:
        """After a rule added into ``targets`` (nothing to do when they are the sums)."""

    #: Weights formed by blocks of rows through their rule's ``rows`` (none here; a sharded accumulator's largest).
    row_blocks: frozenset[str] = frozenset()

    def _add_rows(self, full: str, uses: list[tuple]) -> None:
        """Add Σ_b (Σ_uses g_b)² of weight ``full`` over blocks of its rows; ``uses`` are (rule, module, saved, G)
        of each layer the weight serves (two for a tied embedding and head)."""
        self._rows_into(self.sums[full], full, slice(0, self.sums[full].shape[0]), uses)

    def _rows_into(self, target: torch.Tensor, full: str, rows: slice, uses: list[tuple]) -> None:
        """Add rows ``rows`` of weight ``full``'s Σ_b (Σ_uses g_b)² into ``target`` (those rows only), a block of rows
        at a time: at most a block's worth of per-example rows exists at once."""
        B = uses[0][3].shape[0]
        row_numel = max(1, target.numel() // max(1, target.shape[0]))
        step = max(1, max_block(target) // (B * row_numel))
        for start in range(rows.start, rows.stop, step):
            block = slice(start, min(start + step, rows.stop))
            per_example = None
            for rule, module, saved, G in uses:
                per_example = rule.rows(module, saved, G, block) if per_example is None \
                    else rule.add_rows(module, saved, G, block, per_example)
            add_squares(target[block.start - rows.start:block.stop - rows.start], per_example)

    # ------------------------------------------------------------------ hooks

    def _install(self) -> None:
        for module in self._owner:
            self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _name(self, module: nn.Module) -> str:
        return self._owner[module][0][1].rsplit(".", 1)[0]

    def _on_forward(self, module, args, kwargs, out):
        if self._suspended:
            return None
        if self._recomputing:  # a checkpointed layer's forward again, in backward: keep what its rule needs now
            saved = self._save(module, args, kwargs, out)[1:]
            if module in self._waiting:  # its output gradient came first (nothing between it and the layer's end)
                self._on_backward(module, *saved, self._waiting.pop(module))
            else:
                self._recomputed[module] = saved
            return None
        self._calls[module] = self._calls.get(module, 0) + 1
        if self._calls[module] > 1:
            raise UserError(f"module {self._name(module)} runs more than once per forward pass (shared weights): "
                            "exact per-example Fisher is not supported for it")
        out, rule, saved = self._save(module, args, kwargs, out, keep=not self._in_checkpoint)
        if not out.requires_grad:
            out = out.detach().requires_grad_()
            self._leaves.append(out)
        if self._in_checkpoint:  # its inputs are not kept: the recomputed forward saves them, just before this runs
            out.register_hook(lambda g: self._after_recompute(module, g))
        else:
            out.register_hook(lambda g: self._on_backward(module, rule, saved, g))
        return out

    def _after_recompute(self, module, G) -> None:
        if module in self._recomputed:
            self._on_backward(module, *self._recomputed.pop(module), G)
        else:  # the layer has not been recomputed yet: its forward hook takes G then
            self._waiting[module] = G.detach()

    def _save(self, module, args, kwargs, out, keep: bool = True):
        """(the output with the batch first, the rule that applies — None: recompute the module —, what its
        backward needs; None when ``keep`` is False)."""
        if not isinstance(out, torch.Tensor):
            raise UserError(f"module {self._name(module)} ({type(module).__name__}) owns parameters but does not "
                            "return one tensor: exact per-example Fisher is not supported for it")
        B = self._batch_size
        rule = self._rule[module]
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(x, torch.Tensor):
            rule = None  # called without a tensor input: recompute it instead
        if rule is not None:
            x, out = rule.per_example(x, out, B)
        if out.shape[0] != B or (rule is not None and x.shape[0] != B):
            raise UserError(f"module {self._name(module)} does not keep the batch in its first dimension: "
                            "exact per-example Fisher is not supported for it")
        if not keep:
            return out, rule, None
        saved = rule.save(module, x, out) if rule is not None else None
        if saved is None:
            rule, saved = None, (_detach_tree(args), _detach_tree(kwargs))
            self._no_rule(module)
        return out, rule, saved

    def _no_rule(self, module: nn.Module) -> None:
        """``module`` has no closed form this batch and will be recomputed alone (a sharded accumulator refuses)."""

    def _on_backward(self, module, rule: LayerRule | None, saved, G) -> None:
        if rule is None:
            self._deferred.append((module, saved, G.detach()))
            return
        if rule.modified(saved):
            raise UserError(f"the input of {self._name(module)} was modified in place after its forward; "
                            "cannot form per-example gradients")
        acc = self._targets_of(module)
        G = G.detach()  # in the model's dtype: each rule casts what it sums (a bfloat16 matmul stays bfloat16)
        by_rows = []
        for attr, full in self._owner[module]:
            if full in self._shared:  # summed over its uses before squaring (_finish_shared)
                self._shared_uses.setdefault(full, []).append((rule, module, saved, G))
                acc[attr] = None
            elif full in self.row_blocks:
                by_rows.append(full)
                acc[attr] = None
        rule.accumulate(module, saved, G, acc)
        self._commit(module, acc)
        for full in by_rows:
            self._add_rows(full, [(rule, module, saved, G)])

    def _finish_shared(self) -> None:
        """Each shared matrix: per example, the sum of its uses' gradients, squared — by blocks of rows."""
        for full, uses in self._shared_uses.items():
            self._add_rows(full, uses)
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
        if self._averaged:
            raise RuntimeError("add() after mean(in_place=True): the sums were divided")
        B = self.kind.batch_size(batch)
        if B == 0:
            return 0
        index = batch.get(INDEX_KEY)
        index = list(range(self.count, self.count + B)) if index is None else [int(i) for i in index]
        self._batch_size, self._calls, self._leaves, self._shared_uses = B, {}, [], {}
        self._ran, self._recomputed, self._waiting = set(), {}, {}
        # A checkpointed layer is recomputed whole (not only up to the last tensor its backward needs), so that
        # every module in it saves its input for its rule.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            total = self.kind.log_likelihood(self.model, batch, targets=self.targets, seed=self.seed, index=index)
            if self._leaves:
                torch.autograd.grad(total, self._leaves, allow_unused=True)
        self._leaves = []
        if self._recomputed or self._waiting:
            raise RuntimeError(f"{len(self._recomputed) + len(self._waiting)} checkpointed modules were not both "
                               "recomputed and back-propagated through")
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
        originals = [(layer, layer.__dict__.get("forward")) for layer in self.checkpointed_layers]
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if self.checkpointed_layers and use_cache:  # a recomputed layer would append to the KV cache twice
            config.use_cache = False
        for layer in self.checkpointed_layers:
            layer.forward = self._checkpointed(layer, layer.forward)
        try:
            yield self
        finally:
            if self.checkpointed_layers and use_cache:
                config.use_cache = use_cache
            for layer, forward in originals:
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
            self._remove()
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
            model.train(was_training)

    def _checkpointed(self, layer: nn.Module, forward):
        """``layer``'s forward under non-reentrant activation checkpointing: its activations are dropped after the
        forward and recomputed in backward; the hooks tell the two passes apart (the second saves the inputs)."""
        from torch.utils.checkpoint import checkpoint

        def run(*args, **kwargs):
            recomputing = layer in self._ran
            self._ran.add(layer)
            before = self._recomputing, self._in_checkpoint
            self._recomputing, self._in_checkpoint = recomputing, not recomputing
            try:
                return forward(*args, **kwargs)
            finally:
                self._recomputing, self._in_checkpoint = before

        def checkpointed(*args, **kwargs):
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        return checkpointed

    def __enter__(self):
        self._attachment = self.attached()
        return self._attachment.__enter__()

    def __exit__(self, *exc):
        return self._attachment.__exit__(*exc)

    def all_reduce(self) -> None:
        """Sum ``sums`` and ``count`` over the processes of the default group (under torchrun)."""
        import torch.distributed as dist

        device = next(iter(self.sums.values())).device
        count = torch.tensor([self.count], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        self.count = int(count.item())
        for s in self.sums.values():
            dist.all_reduce(s)

    def mean(self, in_place: bool = False) -> dict[str, torch.Tensor]:
        """The estimate; ``in_place`` divides the sums themselves (no second copy of every parameter's size: for
        a writer that is done with the accumulator)."""
        if self.count == 0:
            raise UserError("no examples: the Fisher estimate needs at least one")
        if self._averaged:
            return dict(self.sums)
        if in_place:
            for s in self.sums.values():
                s.div_(self.count)
            self._averaged = True  # the sums are the mean from now on (count still says how many)
            return dict(self.sums)
        return {name: s / self.count for name, s in self.sums.items()}


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (decoder or encoder layers: transformers'
    ``GradientCheckpointingLayer``s, the unit it checkpoints), the unit of activation checkpointing and of FSDP
    sharding here; empty when it has none (an architecture from before transformers 4.52, or not from it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The layers recomputed under ``--gradient-checkpointing``; one line when the model has none."""
    layers = repeated_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no layers transformers can recompute (GradientCheckpointingLayer "
                        "blocks): drop --gradient-checkpointing")
    return layers


def check_checkpointable(config, kind, name: str) -> None:
    """:func:`checkpoint_layers` on ``name``'s architecture alone (built on the meta device), before anything loads."""
    from gradmatch.models import skeleton

    try:
        model = skeleton(config, kind)
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build so: checked when it loads
        return
    checkpoint_layers(model)


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


def progress_bar(total: int | None, enabled: bool, desc: str = "fisher"):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", desc=desc, disable=not enabled, dynamic_ncols=True)


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
    with acc.attached(), progress_bar(total, progress) as bar:
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
    targets = _targets(estimator)
    kind = _kind_of(model, kind)
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros(p.shape, dtype=sums_dtype(p), device=p.device) for name, p in params.items()}
    count = 0
    try:
        for batch in batches:
            B = kind.batch_size(batch)
            index = batch.get(INDEX_KEY, torch.arange(count, count + B))
            for b in range(B):
                total = kind.log_likelihood(model, _one_example(batch, b), targets=targets, seed=seed,
                                            index=[int(index[b])])
                grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
                for name, g in zip(params, grads):
                    if g is not None:
                        sums[name].add_(g.to(sums[name].dtype).square())
                count += 1
    finally:
        model.train(was_training)
    return {name: s / count for name, s in sums.items()}
