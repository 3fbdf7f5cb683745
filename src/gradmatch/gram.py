"""RegMean's statistics: for every Linear layer, the Gram matrix of its inputs, G = mean over the examples'
non-padding positions of x xᵀ, computed in batches; `run_gram` writes them, keyed by the name of the layer's
weight in the model's checkpoint, with ``gram.json`` (data-parallel under torchrun, like the Fisher)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from gradmatch.errors import UserError
from gradmatch.models import checkpoint_names
from gradmatch.statistics import Loaded, SplitSpec, Statistic, check_arguments, load, run

log = logging.getLogger("gradmatch.merge")

#: The file of a Gram folder that holds the matrices (safetensors, float32, keyed by module name).
GRAM_FILE = "gram.safetensors"
GRAM_RECORD = "gram.json"
#: What the stored matrices are: one normalisation for every layer (RegMean's code averages over tokens).
NORMALISATION = "mean over the non-padding input positions (tokens) of x xᵀ"
_FUSED = "RegMean's Gram matrices are per layer and cannot be paired with it"
#: How far G may be from Gᵀ, relative to its largest entry, when the merge reads it: `gradmatch gram` rounds a
#: float64 sum to float32 (at most one part in 1.7e7 per entry); the margin leaves room for Grams summed in
#: float32 by other code, while a tampered or corrupted Gram is far above.
SYMMETRY_TOLERANCE = 1e-5


def embedding_weights(model: nn.Module) -> set[int]:
    """The ids of the embedding matrices of ``model`` (every nn.Embedding's and the input embeddings'), which a
    Linear with tied weights (an ``lm_head``) shares."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        ids.add(id(weight))
    return ids


def conv1d_layers(model: nn.Module) -> list[str]:
    """The names of the transformers ``Conv1D`` modules of ``model`` (GPT-2's attention and MLP: a Linear
    whose weight is stored in × out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    return [name for name, m in model.named_modules() if isinstance(m, Conv1D)]


def refuse_conv1d(model: nn.Module, label: str) -> None:
    """One line, before any work, for a model whose layers are transformers ``Conv1D``: `gradmatch gram` records
    nn.Linear inputs only, so RegMean would silently average every one of those layers."""
    layers = conv1d_layers(model)
    if layers:
        raise UserError(f"gradmatch gram computes Grams of nn.Linear layers; {label}'s attention and MLP layers are "
                        f"transformers Conv1D (GPT-2 family, e.g. {layers[0]}): RegMean is not available for it")


def _refuse_conv1d_architecture(config, model_kind, label: str) -> None:
    """:func:`refuse_conv1d` on the architecture alone (built on the meta device: no weights, no memory), so that
    the refusal comes before the data and the weights load. An architecture that cannot be built so is checked
    once its weights are loaded instead (:class:`GramAccumulator`)."""
    try:
        from gradmatch.models import skeleton as meta_skeleton

        skeleton = meta_skeleton(config, model_kind)
    except Exception:  # noqa: BLE001 - only an early check: the loaded model is checked again
        return
    refuse_conv1d(skeleton, label)


class GramAccumulator:
    """Running sums Σ x xᵀ (float64) and position counts of the inputs of every ``nn.Linear`` of ``model``.

    A layer's input of shape (batch, length, in) whose (batch, length) matches the batch's
    ``attention_mask`` counts its non-padding positions only; any other input counts every row (a
    classification head sees one vector per example). A Linear whose weight is an embedding matrix (a
    tied ``lm_head``) gets no Gram: its tensor is the embedding, which RegMean averages like every tensor
    that is not a Linear weight (the checkpoint stores it under the embedding's name only). A model with
    transformers ``Conv1D`` layers (GPT-2 family) is refused (``label`` names it in the message).
    """

    def __init__(self, model: nn.Module, label: str = "the model"):
        self.model = model
        refuse_conv1d(model, label)
        tied = embedding_weights(model)
        self.modules = {name: m for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and id(m.weight) not in tied}
        if not self.modules:
            raise UserError("the model has no Linear layers: RegMean has nothing to merge")
        self.sums: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {name: 0 for name in self.modules}
        self.count = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, kwargs, out):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            x = x.detach()
            mask = self._mask
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = x.t() @ x
            if name in self.sums:
                self.sums[name].add_(gram)
            else:
                self.sums[name] = gram
            self.positions[name] += int(x.shape[0])
        return hook

    def add(self, batch: Mapping[str, torch.Tensor], kind) -> int:
        """Run one batch forward (eval mode, no gradients); returns its number of examples."""
        device = next(self.model.parameters()).device
        inputs = kind.model_inputs(batch, device)
        mask = inputs.get("attention_mask")
        self._mask = None if mask is None else mask
        with torch.no_grad():
            self.model(**inputs)
        n = kind.batch_size(batch)
        self.count += n
        return n

    def __enter__(self):
        self.model.eval()
        self._handles = [m.register_forward_hook(self._hook(name), with_kwargs=True) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def means(self) -> dict[str, torch.Tensor]:
        """G of every layer (float32): the mean of x xᵀ over the positions it saw, keyed by the name of the
        layer's weight in the model's checkpoint (see :func:`gradmatch.models.checkpoint_names`)."""
        missing = [name for name in self.modules if name not in self.sums]
        if missing:
            raise UserError(f"Linear layer {missing[0]} never ran on the data: no Gram matrix for it")
        names = checkpoint_names(self.model, [f"{name}.weight" for name in self.modules], _FUSED)
        return {names[f"{name}.weight"]: (s / max(1, self.positions[name])).to(torch.float32)
                for name, s in self.sums.items()}


def estimate_grams(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, kind=None,
                   progress: bool = True, total: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The Gram matrix of every Linear layer's inputs over ``batches``, and the positions each one averaged."""
    from tqdm.auto import tqdm

    if kind is None:
        from gradmatch.kinds import kind_of_config

        kind = kind_of_config(getattr(model, "config", None))
    acc = GramAccumulator(model)
    with acc, tqdm(total=total, unit="ex", desc="gram", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            bar.update(acc.add(batch, kind))
    return acc.means(), dict(acc.positions)


class GramStatistic(Statistic):
    """RegMean's Grams for the shared runner: float64 sums per Linear layer, their positions, all-reduced."""

    desc = "gram"

    def __init__(self, record: dict):
        self.record = record

    def accumulator(self, loaded: Loaded) -> "_BoundGram":
        return _BoundGram(GramAccumulator(loaded.model, f"model {loaded.name}"), loaded.kind)

    def all_reduce(self, bound: "_BoundGram") -> None:
        import torch.distributed as dist

        acc = bound.acc
        device = next(acc.model.parameters()).device
        for module in acc.modules:  # a layer may not have run on a rank's share: every rank sends a sum
            size = acc.modules[module].in_features
            acc.sums.setdefault(module, torch.zeros(size, size, dtype=torch.float64, device=device))
            dist.all_reduce(acc.sums[module])
        counts = torch.tensor([acc.count, *acc.positions.values()], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        acc.count = int(counts[0])
        acc.positions = {m: int(c) for m, c in zip(acc.positions, counts[1:].tolist())}

    def write(self, bound: "_BoundGram", loaded: Loaded, folder: Path, *, world: int) -> None:
        from safetensors.torch import save_file

        from gradmatch import __version__

        from gradmatch.finite import check_finite, dumps, model_cause

        acc = bound.acc
        grams = acc.means()
        check_finite(grams, "the Gram matrices", model_cause(loaded.model, f"model {loaded.name}"))
        names = checkpoint_names(loaded.model, [f"{m}.weight" for m in acc.positions], _FUSED)
        positions = {names[f"{m}.weight"]: n for m, n in acc.positions.items()}
        record = {"examples": acc.count, "positions": positions, "normalisation": NORMALISATION, **self.record,
                  "max_length": loaded.max_length, "model": loaded.name, "kind": loaded.kind.name,
                  "weights_fingerprint": loaded.weights_fingerprint(), "num_processes": world,
                  "gradmatch_version": __version__}
        save_file({k: v.cpu().contiguous() for k, v in grams.items()}, str(folder / GRAM_FILE),
                  metadata={"format": "pt"})
        (folder / GRAM_RECORD).write_text(dumps(record, indent=2) + "\n", encoding="utf-8")


class _BoundGram:
    """A GramAccumulator with its kind, in the runner's shape (``add(batch)``, a context manager)."""

    def __init__(self, acc: GramAccumulator, kind):
        self.acc, self.kind = acc, kind

    def add(self, batch) -> int:
        return self.acc.add(batch, self.kind)

    def __enter__(self):
        self.acc.__enter__()
        return self

    def __exit__(self, *exc):
        return self.acc.__exit__(*exc)


def run_gram(model: str, data: str, split: str, *, out: str | os.PathLike, batch_size: int = 16,
             max_examples: int | None = None, max_length: int = 128, data_dir: str | os.PathLike | None = None,
             overwrite: bool = False, config_name: str | None = None, device: str | None = None,
             progress: bool = True, kind: str | None = None, filters: Mapping[str, object] | None = None) -> Path:
    """Estimate the Gram matrices of ``model`` on ``data``/``split`` and write ``OUT/gram.safetensors`` and
    ``OUT/gram.json`` (atomically). Under torchrun the examples are shared out and the sums all-reduced."""
    out = check_arguments(model, data, out, overwrite=overwrite, batch_size=batch_size, max_length=max_length,
                          max_examples=max_examples, device=device)
    spec = SplitSpec(data, split, config_name=config_name, data_dir=data_dir, filters=filters,
                     max_examples=max_examples)
    loaded = load(model, spec, max_length=max_length, kind=kind, purpose="the Gram", labels=False,
                  check_model=lambda config, model_kind: _refuse_conv1d_architecture(config, model_kind,
                                                                                     f"model {model}"))
    return run(GramStatistic(spec.record()), loaded, out=out, overwrite=overwrite, batch_size=batch_size,
               device=device, progress=progress)


class GramFile:
    """The Gram matrices of one model as `gradmatch gram` wrote them, read one matrix at a time (validated)."""

    def __init__(self, folder: str | os.PathLike, role: str):
        from gradmatch.checkpoints import read_safetensors_header

        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"{role} {folder} does not exist")
        path = folder / GRAM_FILE if folder.is_dir() else folder
        if not path.is_file():
            raise UserError(f"{role} {folder} is not a Gram folder: it has no {GRAM_FILE} (write one with gradmatch gram)")
        self.folder, self.path, self.role = folder, path, role
        self.tensors = read_safetensors_header(path)
        for name, info in self.tensors.items():
            if len(info.shape) != 2 or info.shape[0] != info.shape[1] or not info.is_floating:
                raise UserError(f"{path}: {name} is not a square floating-point matrix (shape {list(info.shape)})")
        record = path.parent / GRAM_RECORD
        self.record: dict = {}
        if record.is_file():
            try:
                self.record = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read {record}: {exc}") from None

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as fh:  # the header was validated when the file was opened
            tensor = fh.get_tensor(name).clone()
        self._check(name, tensor)
        return tensor

    def _zero(self, name: str, where: str) -> None:
        """An all-zero Gram gives its child no say in the layer's merged weight (RegMean's least squares has nothing
        of it to fit). Where gram.json counts positions for the layer, its inputs there were all exactly zero: a
        note says the weight comes from the other children. Without positions (0, or not recorded) the layer saw
        no input — refused, as a layer without a Gram is (engine.plan._check_gram_coverage)."""
        positions = self.record.get("positions")
        seen = positions.get(name) if isinstance(positions, dict) else None
        if isinstance(seen, int) and not isinstance(seen, bool) and seen > 0:
            log.warning("note: %s is zero: its %d input positions were all zero vectors, so this child's data "
                        "does not constrain the layer and RegMean takes its weight from the other children",
                        where, seen)
            return
        if seen == 0:
            why = f"{GRAM_RECORD} records 0 input positions for it"
        else:
            why = f"{GRAM_RECORD} records no positions for it" if self.record else f"no {GRAM_RECORD} counts its inputs"
        raise UserError(f"{where} is all zero and {why}: the layer saw no input, so RegMean would drop this child's "
                        "weight for it silently; compute the Gram with gradmatch gram on data that reaches the layer")

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        """Finite, with a non-negative diagonal and symmetric (to :data:`SYMMETRY_TOLERANCE` of its largest entry,
        or a few roundings of a coarser stored dtype), as every Σ x xᵀ is; one line naming the file and the layer
        otherwise. One pass over the matrix, in blocks of rows (no n × n temporary)."""
        n = tensor.shape[0]
        if not n:
            return
        lo, hi, asymmetry, finite = math.inf, -math.inf, 0.0, True
        step = max(1, (1 << 22) // n)
        for start in range(0, n, step):
            block = tensor[start:start + step]
            low, high = (float(v) for v in torch.aminmax(block))  # NaN propagates
            finite = finite and math.isfinite(low) and math.isfinite(high)
            lo, hi = min(lo, low), max(hi, high)
            asymmetry = max(asymmetry, float((block - tensor[:, start:start + step].t()).abs().max()))
        if not finite:
            raise UserError(f"the Gram matrix of {name} in {self.path} holds NaN or Inf values")
        where = f"{self.role} {self.path}: the Gram of {name}"
        if lo == hi == 0:
            self._zero(name, where)
        diagonal = float(torch.diagonal(tensor).min())
        if diagonal < 0:
            raise UserError(f"{where} has negative diagonal entries (down to {diagonal:.3g}): not a Gram matrix Σ x xᵀ")
        largest = max(abs(lo), abs(hi))
        if asymmetry > max(SYMMETRY_TOLERANCE, 8 * torch.finfo(tensor.dtype).eps) * largest:
            raise UserError(f"{where} is not symmetric (largest asymmetry {asymmetry:.3g}, {asymmetry / largest:.2g} "
                            f"of its largest entry {largest:.3g}): not a Gram matrix Σ x xᵀ")
