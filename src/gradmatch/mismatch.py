"""What the paper bounds about a merge: the residual of its target objective, r(θ̄) = H_0(θ̄ − θ_0) + Σ_t α_t ∇ℓ_t(θ̄),
split into the distance from task arithmetic and the gradient mismatch, and the plain mismatch; for one merged
model or for every merge of a pipeline run (Daheim et al., ICLR 2024, §3)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from gradmatch.errors import UserError

#: The quantities of a merge that `mismatch --run` sets against the test error (name, what it is).
QUANTITIES = {
    "plain_mismatch": "‖Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖ (the paper's Fig. 1)",
    "scaled_mismatch": "‖Σ_t α_t (∇ℓ_t(θ̄) − ∇ℓ_t(θ_t))‖, ℓ_t = N_t·L_t",
    "residual": "‖H_0(θ̄ − θ_0) + Σ_t α_t ∇ℓ_t(θ̄)‖",
    "preconditioned": "‖H̄⁻¹ r(θ̄)‖ ≈ ‖θ̄ − θ_{1:T}‖, H̄ = H_0 + Σ_t α_t H_t",
}


# --------------------------------------------------------------------------- the residual, tensor by tensor


class ResidualAccumulator:
    """The residual of the paper's target objective at a merge θ̄ and its terms, built one task at a time.

    With ℓ_t = N_t·L_t the summed loss of task t (L_t its mean loss), H_0 = N_0·F_0 + δ and the children at
    their optima (H_0 τ_t = −∇ℓ_t(θ_t), τ_t = θ_t − θ_0):

        r(θ̄) = H_0(θ̄ − θ_0) + Σ_t α_t ∇ℓ_t(θ̄)
              = H_0(θ̄ − θ̄_TA)  +  Σ_t α_t [∇ℓ_t(θ̄) − ∇ℓ_t(θ_t)]  +  Σ_t α_t [∇ℓ_t(θ_t) + H_0 τ_t]
                 (prior term)       (scaled mismatch)                 (the children's optimality gap)

    with θ̄_TA = θ_0 + Σ_t α_t τ_t. Task arithmetic has no prior term; gradient matching is built to make the
    residual vanish on quadratic losses, where its scaled mismatch equals minus its prior term. Everything is
    summed in float64, parameter by parameter (dicts of tensors keyed alike).
    """

    def __init__(self, theta_bar: Mapping[str, Any], theta_0: Mapping[str, Any], H_0: Mapping[str, Any]):
        import torch

        self.names = list(theta_bar)
        d = torch.float64
        self.theta_0 = {n: theta_0[n].to(d) for n in self.names}
        self.H_0 = {n: H_0[n].to(d) for n in self.names}
        self.shift = {n: theta_bar[n].to(d) - self.theta_0[n] for n in self.names}  # θ̄ − θ_0
        zeros = {n: torch.zeros_like(self.shift[n]) for n in self.names}
        self.ta_step = {n: z.clone() for n, z in zeros.items()}  # Σ α_t τ_t
        self.merged_pull = {n: z.clone() for n, z in zeros.items()}  # Σ α_t ∇ℓ_t(θ̄)
        self.scaled = {n: z.clone() for n, z in zeros.items()}  # Σ α_t (∇ℓ_t(θ̄) − ∇ℓ_t(θ_t))
        self.plain = {n: z.clone() for n, z in zeros.items()}  # Σ α_t (∇L_t(θ̄) − ∇L_t(θ_t))
        self.curvature: dict[str, Any] | None = {n: h.clone() for n, h in self.H_0.items()}  # H_0 + Σ α_t H_t

    def add_task(self, alpha: float, scale: float, theta_t: Mapping[str, Any], grad_merged: Mapping[str, Any],
                 grad_child: Mapping[str, Any], fisher_t: Mapping[str, Any] | None = None) -> None:
        """Task t: its weight α_t, N_t, child θ_t, ∇L_t at the merge and at the child (mean-loss gradients) and,
        optionally, its Fisher F_t (for the preconditioned norm; without it for any task there is none)."""
        import torch

        d = torch.float64
        for n in self.names:
            g_m, g_c = grad_merged[n].to(d), grad_child[n].to(d)
            self.ta_step[n].add_(theta_t[n].to(d) - self.theta_0[n], alpha=alpha)
            self.plain[n].add_(g_m - g_c, alpha=alpha)
            self.scaled[n].add_(g_m - g_c, alpha=alpha * scale)
            self.merged_pull[n].add_(g_m, alpha=alpha * scale)
            if fisher_t is not None and self.curvature is not None:
                self.curvature[n].add_(fisher_t[n].to(d), alpha=alpha * scale)
        if fisher_t is None:
            self.curvature = None

    def result(self) -> dict[str, float | None]:
        """The norms of the residual, its three terms, the plain and scaled mismatch, and ‖H̄⁻¹ r‖ (None without
        every child's Fisher, or where H̄ is not positive: a removal)."""
        totals = dict.fromkeys(("residual", "prior_term", "scaled_mismatch", "optimality_gap", "plain_mismatch",
                                "preconditioned"), 0.0)
        positive = self.curvature is not None
        for n in self.names:
            r = self.H_0[n] * self.shift[n] + self.merged_pull[n]
            prior = self.H_0[n] * (self.shift[n] - self.ta_step[n])  # H_0 (θ̄ − θ̄_TA)
            gap = r - prior - self.scaled[n]
            totals["residual"] += float(r.square().sum())
            totals["prior_term"] += float(prior.square().sum())
            totals["scaled_mismatch"] += float(self.scaled[n].square().sum())
            totals["optimality_gap"] += float(gap.square().sum())
            totals["plain_mismatch"] += float(self.plain[n].square().sum())
            if positive and bool((self.curvature[n] > 0).all()):
                totals["preconditioned"] += float((r / self.curvature[n]).square().sum())
            else:
                positive = False
        out: dict[str, float | None] = {k: math.sqrt(v) for k, v in totals.items()}
        if not positive:
            out["preconditioned"] = None
        return out


def _norm(tensors: Iterable[Any]) -> float:
    return math.sqrt(sum(float((t.double() * t.double()).sum()) for t in tensors))


# --------------------------------------------------------------------------- gradients of a model on data


def loss_gradient(model, batches: Iterable[Mapping[str, Any]], kind=None
                  ) -> tuple[dict[str, Any], float, dict[str, float], int]:
    """∇ of the mean per-example loss over all examples of ``batches`` (the kind's loss: cross-entropy of the
    true label for classifiers, the summed next-token NLL of a sequence for causal LMs; eval mode, float64 sums).

    Returns (gradient by parameter name, mean loss, the kind's metrics of the loss, number of examples).
    """
    import torch

    if kind is None:
        from gradmatch.kinds import kind_of_config

        kind = kind_of_config(getattr(model, "config", None))
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    total_loss, count, extra = 0.0, 0, {}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss, n, more = kind.loss(model, batch)
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().to(torch.float64)
        total_loss += float(loss.detach())
        count += n
        for key, value in more.items():
            extra[key] = extra.get(key, 0.0) + value
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise UserError("no examples to measure the gradient mismatch on")
    from gradmatch.finite import check_finite

    name = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    check_finite(sums, f"the loss gradient of model {name}", "its loss overflowed on these examples (a wrecked merge?) "
                 "and the mismatch would not be finite")
    return {n: s / count for n, s in sums.items()}, total_loss / count, kind.loss_metrics(extra, count, total_loss), count


def _batches(model_path: str, data: str, split: str, *, max_length: int, batch_size: int, data_dir,
             max_examples: int | None, cache: dict):
    """The model at ``model_path`` and batches of ``data`` for it, through the statistic runner's loading and checks
    (:func:`gradmatch.statistics.load`); encodings are shared by models with the same processor (``cache``)."""
    from gradmatch.statistics import SplitSpec, load

    loaded = load(model_path, SplitSpec(data, split, data_dir=data_dir, max_examples=max_examples),
                  max_length=max_length, purpose="the gradient mismatch")
    key = (data, loaded.kind.name, type(loaded.processor).__name__, getattr(loaded.processor, "name_or_path", None))
    if key in cache:
        loaded._encoded = cache[key]
    cache[key] = loaded.encoded()
    return loaded.model, list(loaded.batches(batch_size=batch_size)), loaded.kind


def _parameters(model) -> dict[str, Any]:
    return {n: p.detach().to("cpu") for n, p in model.named_parameters()}


def _hessian(folder: str | os.PathLike, kind) -> dict[str, Any]:
    """A Hessian folder (the original's layout: a model folder of F values) as parameters keyed like the model's."""
    from gradmatch.checkpoints import find_hessian_folder

    folder = find_hessian_folder(Path(folder))
    try:
        model = kind.auto_class().from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - corrupt, missing, of another architecture
        raise UserError(f"cannot load the Hessian {folder}: {' '.join(str(exc).split())[:200]}") from None
    return _parameters(model)


# --------------------------------------------------------------------------- one merged model


@dataclass
class TaskMismatch:
    """One task t of a merge: its plain mismatch α_t‖∇L_t(θ̄) − ∇L_t(θ_t)‖ and the merged model's loss there."""

    task: str
    child: str
    alpha: float
    scale: float
    num_examples: int
    mismatch: float
    grad_norm_merged: float
    grad_norm_child: float
    loss_merged: float
    accuracy_merged: float | None  # classifiers; None for kinds without accuracy
    metrics_merged: dict = field(default_factory=dict)

    @property
    def error_merged(self) -> float | None:
        return None if self.accuracy_merged is None else 1.0 - self.accuracy_merged


@dataclass
class MergeMismatch:
    """A merge's plain mismatch and, with the parent's Hessian, the residual of the paper's objective and its terms."""

    merged: str
    split: str
    tasks: list[TaskMismatch] = field(default_factory=list)
    total_mismatch: float = 0.0  # ‖Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖₂, the plain mismatch
    residual: dict[str, float | None] | None = None  # ResidualAccumulator.result(); None without H_0
    scales: dict[str, Any] = field(default_factory=dict)  # N_0, δ, N_t used, and where they came from

    @property
    def mean_error(self) -> float | None:
        errors = [t.error_merged for t in self.tasks]
        return None if None in errors else sum(errors) / len(errors)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for task, row in zip(self.tasks, data["tasks"]):
            row["error_merged"] = task.error_merged
        data["mean_error"] = self.mean_error
        return data


_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
_Name = Annotated[str, Field(min_length=1)]


class _RecordedInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: _Name
    fingerprint: _Name


class _RecordedChild(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: _Name
    weight: _Number
    hessian: _Name | None = None
    hessian_scale: _Positive | None = None


class _RecordedParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    delta_0: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)] | None = None


class MergeRecord(BaseModel):
    """The part of ``merge.json`` (written by gradmatch merge) that `mismatch` reads; the rest is not checked."""

    model_config = ConfigDict(extra="allow")

    models: list[_RecordedChild] = Field(min_length=1)
    base: _Name | None = None
    base_hessian: _Name | None = None
    base_hessian_scale: _Positive | None = None
    parameters: _RecordedParameters | None = None
    prior_level: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)] | None = None
    inputs: dict[str, _RecordedInput] | None = None


def merge_record(merged: str | os.PathLike) -> dict[str, Any]:
    """A merged folder's ``merge.json`` (written by gradmatch merge), its schema checked (:class:`MergeRecord`): a
    record that is not JSON or was edited into another shape is one line naming the key."""
    from gradmatch.config import validate

    record = Path(merged) / "merge.json"
    if not record.is_file():
        raise UserError(f"{merged} has no merge.json: give the children and alphas explicitly")
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{record} is not a merge record gradmatch can read: {exc}") from None
    if not isinstance(info, dict):
        raise UserError(f"{record} is not a merge record gradmatch can read: it holds a {type(info).__name__}, not "
                        "a mapping")
    validate(MergeRecord, info, f"{record} (not a merge record gradmatch can read)")
    return info


def merge_sources(merged: str | os.PathLike) -> tuple[list[str], list[float]]:
    """The children and α_t recorded in a merged folder's ``merge.json``."""
    models = merge_record(merged)["models"]
    return [str(m["model"]) for m in models], [float(m["weight"]) for m in models]


def _recorded(record: dict[str, Any], role: str, name: str | None) -> str | None:
    """Where the input ``role`` of a merge is: the absolute path its record's ``inputs`` holds, else ``name``."""
    entry = (record.get("inputs") or {}).get(role)
    return str(entry["path"]) if entry else name


def verify_recorded(merged: str | os.PathLike, record: dict[str, Any], roles: Mapping[str, str]) -> None:
    """Every input ``roles`` (role in merge.json → the folder that will be read) holds the weights the merge read:
    its fingerprint equals the one ``merge.json`` records (checkpoints.fingerprint_matches). A child, parent or
    Hessian replaced since the merge is one line naming it and how to measure other models on purpose; a record
    without fingerprints (written before they were) gets a note."""
    import logging

    from gradmatch.checkpoints import fingerprint_matches

    recorded = record.get("inputs") or {}
    where = Path(merged) / "merge.json"
    unchecked = []
    for role, folder in roles.items():
        entry = recorded.get(role)
        if not Path(folder).exists():
            raise UserError(f"{where} names {role} {folder}, which does not exist (moved or deleted since the merge); "
                            "give the models explicitly (--children, --parent, --base-hessian, --hessians)")
        if entry is None:
            unchecked.append(role)
            continue
        if not Path(folder).is_dir() or not fingerprint_matches(folder, entry["fingerprint"]):
            flag = {"base": "--parent", "base_hessian": "--base-hessian"}.get(role, "--hessians" if role.endswith(
                ".hessian") else "--children")
            raise UserError(f"{role} {folder} is not the model {merged} was merged from: its weights differ from the "
                            f"fingerprint {where} records ({entry['fingerprint'][:23]}…; replaced or retrained since "
                            f"the merge); to measure other models on purpose, name them with {flag}")
    if unchecked:
        logging.getLogger(__name__).warning("note: %s records no fingerprint of %s: cannot check that they are the "
                                            "models it was merged from", where, ", ".join(unchecked))


def child_task(child: str | os.PathLike) -> str:
    """The data set a child was trained on, from its ``training_metadata.json``."""
    from gradmatch.train import read_training_metadata

    meta = read_training_metadata(child)
    if not meta or not meta.get("dataset_name"):
        raise UserError(f"child {child} has no training_metadata.json naming its data set: pass --data")
    return str(meta["dataset_name"])


def _training_size(model: str | os.PathLike) -> int | None:
    from gradmatch.train import read_training_metadata

    meta = read_training_metadata(model) or {}
    value = meta.get("num_train_examples")
    return int(value) if isinstance(value, int) and value > 0 else None


@dataclass
class MismatchPlan:
    """What one `mismatch` measures, resolved and checked before any model loads: the merge, each child with its
    data set, α_t and N_t, and — for the residual — the parent, F_0 (a folder or ``prior`` with its level), N_0, δ
    and the children's F_t."""

    merged: str
    children: list[str]
    data: list[str]
    alphas: list[float]
    scales: list[float | None]
    parent: str | None
    base_hessian: str | None
    base_hessian_scale: float | None
    delta_0: float
    hessians: list[str] | None
    prior_level: float | None
    residual_wanted: bool

    def inputs(self) -> dict[str, str]:
        """Every file or folder the measurement reads (description → path), for the check that --out is none."""
        found = {"the merged model": self.merged}
        found.update({f"child {i + 1}": c for i, c in enumerate(self.children)})
        found.update({f"the data of child {i + 1}": d for i, d in enumerate(self.data)})
        if self.residual_wanted:
            found["the parent"] = str(self.parent)
            from gradmatch.config.merge import PRIOR

            if self.base_hessian != PRIOR:
                found["the parent's Hessian"] = str(self.base_hessian)
            found.update({f"the Hessian of child {i + 1}": h for i, h in enumerate(self.hessians or [])})
        return found


def plan_mismatch(
    merged: str | os.PathLike,
    *,
    children: Sequence[str] | None = None,
    data: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    parent: str | None = None,
    base_hessian: str | None = None,
    base_hessian_scale: float | None = None,
    scales: Sequence[float] | None = None,
    hessians: Sequence[str] | None = None,
    delta_0: float | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    max_examples: int | None = None,
) -> MismatchPlan:
    """Resolve what :func:`gradient_mismatch` measures (defaults from ``merge.json``, see there) and check it: the
    record's schema, the counts and sizes, and that every model taken from the record is the one the merge read
    (:func:`verify_recorded`)."""
    from gradmatch.config.merge import PRIOR

    record = merge_record(merged) if (children is None or alphas is None or parent is None
                                      or base_hessian == PRIOR) and (Path(merged) / "merge.json").is_file() else {}
    if (children is None or alphas is None) and not record:
        merge_record(merged)  # the one-line error
    models = record.get("models", [])
    from_record: dict[str, str] = {}  # role in merge.json -> the folder read for it
    if children is None:
        children = [_recorded(record, f"models[{i}]", str(m["model"])) for i, m in enumerate(models)]
        from_record.update({f"models[{i}]": c for i, c in enumerate(children)})
    children = [str(c) for c in children]
    if record:  # before a child's training metadata is read for its data set
        verify_recorded(merged, record, dict(from_record))
    alphas = [float(a) for a in (alphas if alphas is not None else [m["weight"] for m in models])]
    if len(alphas) != len(children):
        raise UserError(f"{len(alphas)} alphas given for {len(children)} children")
    if not all(math.isfinite(a) for a in alphas):
        raise UserError(f"every alpha must be a finite number (got {', '.join(f'{a:g}' for a in alphas)})")
    if batch_size <= 0 or max_length <= 0 or (max_examples is not None and max_examples <= 0):
        raise UserError("batch size, max length and max examples must be positive")
    data = [str(d) for d in data] if data is not None else [child_task(c) for c in children]
    if len(data) != len(children):
        raise UserError(f"{len(data)} data sets given for {len(children)} children")
    if parent is None and record.get("base") is not None:
        parent = from_record["base"] = _recorded(record, "base", str(record["base"]))
    if base_hessian is None and record.get("base_hessian") is not None:
        base_hessian = str(record["base_hessian"])
        if base_hessian != PRIOR:
            base_hessian = from_record["base_hessian"] = _recorded(record, "base_hessian", base_hessian)
    base_hessian_scale = base_hessian_scale if base_hessian_scale is not None else record.get("base_hessian_scale")
    if delta_0 is None:
        recorded_delta = (record.get("parameters") or {}).get("delta_0")
        delta_0 = float(recorded_delta) if recorded_delta is not None else 1e-12
    recorded_scales = [m.get("hessian_scale") for m in models] if models else [None] * len(children)
    if scales is None:
        scales = [s if s is not None else _training_size(c) for s, c in zip(recorded_scales, children)]
    if len(scales) != len(children):
        raise UserError(f"{len(scales)} scales given for {len(children)} children")
    if hessians is None and models and all(m.get("hessian") for m in models):
        hessians = [_recorded(record, f"models[{i}].hessian", str(m["hessian"])) for i, m in enumerate(models)]
        from_record.update({f"models[{i}].hessian": h for i, h in enumerate(hessians)})
    hessians = [str(h) for h in hessians] if hessians is not None else None
    if hessians is not None and len(hessians) != len(children):
        raise UserError(f"{len(hessians)} Hessians given for {len(children)} children")
    residual_wanted = base_hessian is not None and parent is not None
    if residual_wanted:
        if base_hessian_scale is None:
            base_hessian_scale = _training_size(parent)
        if base_hessian_scale is None or any(s is None for s in scales):
            raise UserError("the residual needs N_0 and every N_t (the Hessians' scales): give --base-hessian-scale and "
                            "--scales, or children and a parent with training_metadata.json")
        if base_hessian == PRIOR and record.get("prior_level") is None:
            raise UserError(f"base_hessian {PRIOR} needs the prior's level c, which {merged}/merge.json "
                            "does not record: give --base-hessian a Hessian folder")
    else:  # the parent and the Hessians are not read
        from_record = {role: f for role, f in from_record.items() if role.startswith("models[") and "." not in role}
    if record:
        verify_recorded(merged, record, {r: f for r, f in from_record.items() if not r.startswith("models[")
                                         or "." in r})
    return MismatchPlan(str(merged), children, data, alphas, list(scales), parent, base_hessian, base_hessian_scale,
                        float(delta_0), hessians, record.get("prior_level"), residual_wanted)


def gradient_mismatch(
    merged: str | os.PathLike,
    *,
    children: Sequence[str] | None = None,
    data: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    parent: str | None = None,
    base_hessian: str | None = None,
    base_hessian_scale: float | None = None,
    scales: Sequence[float] | None = None,
    hessians: Sequence[str] | None = None,
    delta_0: float | None = None,
    split: str = "test",
    max_length: int = 128,
    batch_size: int = 16,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    child_gradients: dict | None = None,
    progress: bool = True,
) -> MergeMismatch:
    """The plain mismatch of ``merged`` on held-out data of each child's task and, when the parent's Hessian is
    known, the residual r(θ̄) of the paper's target objective and its terms (:class:`ResidualAccumulator`).

    Children, α_t, the parent, its Hessian F_0, N_0, δ and N_t default to the merge's own record
    (``merge.json``), whose fingerprints must match the models found there now; N_t otherwise to the children's
    training-set sizes; data sets to each child's training data set. Without a parent Hessian (e.g. a
    task-arithmetic merge made outside a run) only the plain mismatch is measured. ``hessians`` (the children's
    F_t) add ‖H̄⁻¹ r‖. ``child_gradients``, a dict kept by the caller, caches ∇L_t(θ_t) across calls.
    """
    plan = plan_mismatch(merged, children=children, data=data, alphas=alphas, parent=parent,
                         base_hessian=base_hessian, base_hessian_scale=base_hessian_scale, scales=scales,
                         hessians=hessians, delta_0=delta_0, max_length=max_length, batch_size=batch_size,
                         max_examples=max_examples)
    return measure(plan, split=split, max_length=max_length, batch_size=batch_size, data_dir=data_dir,
                   max_examples=max_examples, child_gradients=child_gradients, progress=progress)


def measure(plan: MismatchPlan, *, split: str = "test", max_length: int = 128, batch_size: int = 16,
            data_dir: str | os.PathLike | None = None, max_examples: int | None = None,
            child_gradients: dict | None = None, progress: bool = True) -> MergeMismatch:
    """Measure a :class:`MismatchPlan` (see :func:`gradient_mismatch`)."""
    import torch
    from tqdm.auto import tqdm

    from gradmatch.config.merge import PRIOR

    merged, parent, base_hessian, delta_0 = plan.merged, plan.parent, plan.base_hessian, plan.delta_0
    if child_gradients is None:
        child_gradients = {}
    result = MergeMismatch(merged=str(merged), split=split, scales={
        "base_hessian": base_hessian, "base_hessian_scale": plan.base_hessian_scale, "delta_0": delta_0,
        "hessian_scales": list(plan.scales)})
    cache: dict = {}
    accumulator = theta_0 = None
    bar = tqdm(list(zip(plan.children, plan.data, plan.alphas, plan.scales)), desc="gradient mismatch", unit="task",
               disable=None if progress else True)
    for t, (child, task, alpha, scale) in enumerate(bar):
        child_key = (str(child), task, split, max_length, max_examples)
        model, loader, kind = _batches(str(merged), task, split, max_length=max_length, batch_size=batch_size,
                                       data_dir=data_dir, max_examples=max_examples, cache=cache)
        if accumulator is None and plan.residual_wanted:
            theta_bar = _parameters(model)
            parent_model, _, _ = _batches(str(parent), task, split, max_length=max_length, batch_size=batch_size,
                                          data_dir=data_dir, max_examples=max_examples, cache=cache)
            theta_0 = _parameters(parent_model)
            if base_hessian == PRIOR:  # the merge's isotropic prior: H_0 = N_0·c + δ, c from merge.json
                level = float(plan.prior_level)
                H_0 = {n: torch.full_like(p, float(plan.base_hessian_scale) * level + delta_0, dtype=torch.float64)
                       for n, p in theta_bar.items()}
            else:
                F_0 = _hessian(base_hessian, kind)
                if F_0.keys() != theta_bar.keys():
                    raise UserError(f"the Hessian {base_hessian} and the merge {merged} have different parameters")
                H_0 = {n: float(plan.base_hessian_scale) * F_0[n].double() + delta_0 for n in F_0}
            accumulator = ResidualAccumulator(theta_bar, theta_0, H_0)
            del parent_model
        g_merged, loss, metrics, n = loss_gradient(model, loader, kind)
        del model
        if child_key not in child_gradients:
            child_model, child_loader, _ = _batches(str(child), task, split, max_length=max_length,
                                                    batch_size=batch_size, data_dir=data_dir,
                                                    max_examples=max_examples, cache=cache)
            g_child, *_ = loss_gradient(child_model, child_loader, kind)
            child_gradients[child_key] = (g_child, _parameters(child_model))
            del child_model
        g_child, theta_t = child_gradients[child_key]
        if g_merged.keys() != g_child.keys():
            raise UserError(f"{merged} and {child} have different parameters")
        plain = math.sqrt(sum(float((alpha * (g_merged[k] - g_child[k])).square().sum()) for k in g_merged))
        if accumulator is not None:
            fisher_t = _hessian(plan.hessians[t], kind) if plan.hessians else None
            accumulator.add_task(alpha, float(scale), theta_t, g_merged, g_child, fisher_t)
        result.tasks.append(TaskMismatch(
            task=task, child=str(child), alpha=alpha, scale=float(scale) if scale is not None else float("nan"),
            num_examples=n, mismatch=plain, grad_norm_merged=_norm(g_merged.values()),
            grad_norm_child=_norm(g_child.values()), loss_merged=loss, accuracy_merged=metrics.get("accuracy"),
            metrics_merged=metrics))
        if t == 0:
            total = {k: alpha * (g_merged[k] - g_child[k]) for k in g_merged}
        else:
            for k in total:
                total[k] += alpha * (g_merged[k] - g_child[k])
    bar.close()
    result.total_mismatch = _norm(total.values()) if result.tasks else 0.0
    if accumulator is not None:
        result.residual = accumulator.result()
    return result


def write_mismatch(merged: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   **kwargs) -> MergeMismatch:
    """:func:`gradient_mismatch` written to the JSON file ``out`` (atomically; non-finite numbers as strings, see
    :mod:`gradmatch.finite`). ``out`` is checked before any model loads: new unless ``overwrite``, not a folder, and
    none of the files and folders the measurement reads (the merge and its merge.json, a child, the parent, a
    Hessian, a data file)."""
    from gradmatch.finite import dumps
    from gradmatch.fsutil import atomic_file, check_not_input

    out = Path(out)
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a folder")
    if os.path.lexists(out) and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {out}: {ancestor} is not a folder, so its parent is not one")
    run = {k: kwargs.pop(k) for k in ("split", "data_dir", "child_gradients", "progress") if k in kwargs}
    plan = plan_mismatch(merged, **kwargs)
    check_not_input(out, plan.inputs(), "--out")
    result = measure(plan, **run, **{k: kwargs[k] for k in ("max_length", "batch_size", "max_examples") if k in kwargs})
    with atomic_file(out, encoding="utf-8") as fh:
        fh.write(dumps(result.to_json(), indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- every merge of a pipeline run


def _finished_merge_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """The job specs of the run's finished merge jobs, in the order of the run's plan (relocated into ``run_dir``)."""
    from gradmatch.pipeline.graph import read_run_specs

    specs = read_run_specs(run_dir, "merge")
    finished = [s for s in specs if (Path(s["out"]) / "metrics.json").is_file()]
    if not finished:
        raise UserError(f"run {run_dir} has no finished merge jobs yet")
    return finished


def _run_scales(run_dir: Path, spec: dict[str, Any]) -> tuple[str | None, float | None, list[float], str | None]:
    """The run's parent Hessian, N_0, N_t and the merge's seed prefix: the same for every method of a seed, so
    the residual of task arithmetic and of gradient matching are measured on one scale."""
    from gradmatch.pipeline.graph import read_run_specs

    prefix = spec["name"].split("merges/", 1)[0]
    by_name = {s["name"]: s for s in read_run_specs(run_dir)}
    fisher = by_name.get(f"{prefix}fisher/parent")
    base_hessian = str(Path(fisher["out"]) / "fisher") if fisher and (Path(fisher["out"]) / "job.json").is_file() else None
    parent = spec["inputs"]["parent"]
    n0 = spec["params"].get("base_hessian_scale") or _training_size(Path(parent) / "model")
    scales = [(spec["params"].get("hessian_scales") or {}).get(c) or _training_size(Path(spec["inputs"][f"child/{c}"]) / "model")
              for c in spec["params"]["children"]]
    return base_hessian, n0, scales, prefix


def run_mismatch(run_dir: str | os.PathLike, *, max_examples: int | None = 100, max_length: int = 128,
                 batch_size: int = 16, progress: bool = True, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The plain mismatch and the residual of every merge (each method at each α, each seed, or only the ``seeds``
    given) of a finished run.

    Each merge is rebuilt from the YAML its job kept (``configs/alpha-*.yaml``) into a temporary folder (or
    read from ``models/`` when kept), measured on the first ``max_examples`` examples of each child's test set
    as the run prepared it, with the run's parent Hessian and training-set sizes for every method, and set
    beside its test error from the run's metrics.
    """
    import shutil
    import tempfile

    import yaml
    from tqdm.auto import tqdm

    from gradmatch.merge import merge

    run_dir = Path(run_dir)
    rows: list[dict[str, Any]] = []
    cache: dict = {}
    jobs = _finished_merge_jobs(run_dir)
    if seeds is not None:
        wanted = {f"seed-{int(s)}/" for s in seeds}
        jobs = [spec for spec in jobs if not spec["name"].startswith("seed-") or spec["name"].split("merges/")[0] in wanted]
        if not jobs:
            raise UserError(f"run {run_dir} has no finished merge of seed {', '.join(map(str, seeds))}")
    work = [(spec, entry) for spec in jobs
            for entry in json.loads((Path(spec["out"]) / "metrics.json").read_text(encoding="utf-8"))["alphas"]]
    bar = tqdm(work, desc="mismatch of each merge", unit="merge", disable=None if progress else True)
    with tempfile.TemporaryDirectory(prefix="gradmatch-mismatch-", dir=run_dir) as tmp:
        for spec, entry in bar:
            params, inputs, out = spec["params"], spec["inputs"], Path(spec["out"])
            tag = f"alpha-{entry['alpha']:g}"
            children = params["children"]
            model = out / "models" / tag
            if not model.is_dir():
                config = yaml.safe_load((out / "configs" / f"{tag}.yaml").read_text(encoding="utf-8"))
                model = merge(config, Path(tmp) / f"m-{len(rows)}", progress=False)
            base_hessian, n0, scales, prefix = _run_scales(run_dir, spec)
            result = gradient_mismatch(
                model, children=[str(Path(inputs[f"child/{c}"]) / "model") for c in children],
                alphas=[float(entry["alpha"])] * len(children),
                data=[str(Path(inputs[f"test/{c}"]) / "data") for c in children], split="test",
                parent=str(Path(inputs["parent"]) / "model"), base_hessian=base_hessian, base_hessian_scale=n0,
                scales=scales, hessians=None, max_examples=max_examples, max_length=max_length,
                batch_size=batch_size, child_gradients=cache, progress=False)
            errors = {c: 1.0 - float(entry["tasks"][c]["accuracy"]) for c in children}
            rows.append({
                "method": params["method"], "label": params["label"], "alpha": float(entry["alpha"]),
                "seed": prefix.strip("/").removeprefix("seed-") or None,
                "plain_mismatch": result.total_mismatch, "total_mismatch": result.total_mismatch,
                "mismatch": {c: t.mismatch for c, t in zip(children, result.tasks)},
                **({k: v for k, v in (result.residual or {}).items() if k != "plain_mismatch"}),
                "test_error": errors, "mean_test_error": sum(errors.values()) / len(errors),
                "examples_per_task": result.tasks[0].num_examples, "scales": result.scales,
            })
            if model.parent == Path(tmp):
                shutil.rmtree(model)
    bar.close()
    return rows


def rank_correlations(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Spearman's rank correlation of the mean test error with each quantity, across every merge of ``rows``."""
    from scipy.stats import spearmanr

    out: dict[str, float | None] = {}
    for key in QUANTITIES:
        pairs = [(r[key], r["mean_test_error"]) for r in rows if r.get(key) is not None]
        if len(pairs) < 3:
            out[key] = None
            continue
        rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
        out[key] = None if rho != rho else float(rho)
    return out


def plot_mismatch(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Test error against each quantity (plain mismatch, scaled mismatch, residual, preconditioned residual), one
    colour per method, α written beside each point (the paper's Fig. 1, right, and what it bounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correlations = rank_correlations(rows)
    keys = [k for k in QUANTITIES if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 4.2), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = sorted((r for r in rows if r["label"] == label and r.get(key) is not None), key=lambda r: r["alpha"])
            xs = [r[key] for r in mine]
            ys = [100 * r["mean_test_error"] for r in mine]
            ax.plot(xs, ys, "o", label=label, alpha=0.8)
            for r, x, y in zip(mine, xs, ys):
                ax.annotate(f"{r['alpha']:g}", (x, y), textcoords="offset points", xytext=(3, 2), fontsize=6)
        rho = correlations.get(key)
        ax.set_title(f"{key.replace('_', ' ')}" + (f" (Spearman ρ = {rho:.2f})" if rho is not None else ""), fontsize=9)
        ax.set_xlabel(QUANTITIES[key], fontsize=7)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean test error of the merged tasks (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "test error against what the paper bounds (numbers: α)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_run_mismatch(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, overwrite: bool = False,
                       **kwargs) -> Path:
    """Measure every merge of a run (:func:`run_mismatch`) and write ``mismatch.json`` (rows and rank correlations)
    and the plot to ``out`` (default ``RUN_DIR/mismatch``), atomically."""
    from gradmatch.finite import dumps
    from gradmatch.fsutil import atomic_dir, check_not_input, check_output_dir
    from gradmatch.pipeline.graph import read_run_specs

    out = Path(out) if out is not None else Path(run_dir) / "mismatch"
    check_output_dir(out, overwrite)
    real_out, real_run = Path(os.path.realpath(out)), Path(os.path.realpath(run_dir))
    if real_out == real_run or real_out in real_run.parents:
        raise UserError(f"--out {out} is or contains the run {run_dir}: replacing it would delete the run (choose a "
                        "folder outside it, or the default RUN_DIR/mismatch)")
    inputs = {}
    for spec in read_run_specs(run_dir):  # the jobs' folders: a merge, a child, a data set, the report
        job = f"the {spec.get('kind', '')} job {spec.get('name', '')}"
        inputs[f"the folder of {job}"] = spec.get("out")
        inputs.update({f"the input {role} of {job}": path for role, path in spec["inputs"].items()})
    check_not_input(out, inputs, "--out")
    rows = run_mismatch(run_dir, **kwargs)
    record = {"run": str(run_dir), "quantities": QUANTITIES, "rank_correlation_with_error": rank_correlations(rows),
              "merges": rows}
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "mismatch.json").write_text(dumps(record, indent=2) + "\n", encoding="utf-8")
        plot_mismatch(rows, tmp / "mismatch_vs_error.png")
    return out
