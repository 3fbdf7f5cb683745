"""AdamW's second moment as a Hessian (gradmatch.fisher.optimizer): the bookkeeping against gradients recomputed
by hand, the F ≈ B·v̂ relation on a toy model at its optimum, and `gradmatch train --save_hessian adam`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_bert, make_tiny_lm, write_jsonl


class _Recorder:
    """A test-side TrainerCallback: each micro-batch's inputs (forward pre-hook) and, per step, the parameters and
    the gradient AdamW is about to square."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.trainer, self.steps, self._micro = trainer, [], []
        recorder = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                trainer.model.register_forward_pre_hook(recorder._pre, with_kwargs=True)

            def on_pre_optimizer_step(self, args, state, control, **kw):
                model = trainer.model
                recorder.steps.append({
                    "micro": recorder._micro,
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                })
                recorder._micro = []

        self.callback = CB()

    def _pre(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self._micro.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})


def _per_example_grads(model, micro: dict, causal: bool) -> list[torch.Tensor]:
    """∇ℓ_n of every example of one micro-batch, by autograd one example at a time (flattened, float64)."""
    grads = []
    params = [p for p in model.parameters() if p.requires_grad]
    for b in range(micro["labels"].shape[0]):
        one = {k: v[b:b + 1] for k, v in micro.items() if k != "labels" and v.dim() > 0}
        labels = micro["labels"][b:b + 1]
        logits = model(**one).logits.float()
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).double()
                                for x, p in zip(g, params)]))
    return grads


def _train(model_dir, data, out, *, causal: bool, **overrides):
    """Train with gradmatch's own set-up but keep the Trainer to inspect (the callback writes the Hessian)."""
    from transformers import Trainer

    from gradmatch.config.run import load_train_config
    from gradmatch.data import load_split
    from gradmatch.fisher.optimizer import SaveHessianCallback
    from gradmatch.models import kind_of, load_model
    from gradmatch.train import _training_arguments

    cfg = load_train_config({"model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(out),
                             "dropout": 0.0, **overrides})
    kind = kind_of(str(model_dir))
    torch.manual_seed(0)
    model, processor = load_model(str(model_dir), kind=kind, dropout=0.0)
    encoded = kind.encode(load_split(str(data), "train"), processor, 32)
    args = _training_arguments(cfg, out, quiet=True, has_eval=False)
    trainer = Trainer(model=model, args=args, data_collator=kind.collator(processor), train_dataset=encoded,
                      processing_class=processor)
    recorder = _Recorder(trainer)
    trainer.add_callback(recorder.callback)
    hessian = SaveHessianCallback(trainer, out / "saved", num_train_examples=len(encoded))
    trainer.add_callback(hessian)
    trainer.train()
    return trainer, recorder, hessian


@pytest.mark.parametrize("causal", [False, True], ids=["classifier", "causal-lm"])
def test_bookkeeping_against_gradients_recomputed_by_hand(causal, tmp_path, one_thread):
    """exp_avg_sq is the EMA of the gradients AdamW saw; each of them is c_k Σ_n x_n ∇ℓ_n with coefficients found
    by least squares from per-example gradients computed by hand; the saved F̂ = exp_avg_sq / Σ_k (1−β2)β2^(K−k) Σ x².
    Accumulation of 2 micro-batches, a partial last batch, clipping on every step, variable lengths (LM)."""
    if causal:
        model_dir = make_tiny_lm(tmp_path / "lm", family="llama")
        rows = [{"text": t} for t in ["the movie was great", "a dull film", "what a waste of time, the plot made no sense",
                                      "superb", "terrible plot and awful acting", "a warm funny comedy", "boring"]]
    else:
        model_dir = make_tiny_bert(tmp_path / "bert", hidden=8, layers=1)
        rows = [{"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": i % 2} for i in range(7)]
    data = write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    beta2 = 0.95
    trainer, recorder, hessian = _train(model_dir, data, tmp_path / "out", causal=causal, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2, num_train_epochs=2, beta2=beta2,
                                        max_grad_norm=0.05, learning_rate=1e-3)
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    K = len(recorder.steps)
    assert K == hessian.steps == 4  # 7 examples = 4 micro-batches of ≤2 = 2 steps per epoch
    ema = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    weight = 0.0
    state = {id(p): p for p in model.parameters()}
    for k, step in enumerate(recorder.steps):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(step["params"][n])
        G = torch.stack([g for micro in step["micro"] for g in _per_example_grads(model, micro, causal)])  # (N, P)
        seen = torch.cat([step["grads"][n].reshape(-1).double() for n in names])
        x = torch.linalg.lstsq(G.T, seen.unsqueeze(1)).solution.squeeze(1)  # seen = Σ_n x_n ∇ℓ_n
        assert torch.allclose(G.T @ x, seen, rtol=1e-4, atol=1e-7 * float(seen.abs().max()))
        assert math.isclose(hessian.history[k]["clip"] ** 2 * hessian.history[k]["sum_sq_weights"],
                            float((x * x).sum()), rel_tol=1e-3)
        weight = beta2 * weight + (1 - beta2) * float((x * x).sum())
        for n in names:
            ema[n] = beta2 * ema[n] + (1 - beta2) * step["grads"][n].double() ** 2
    assert sum(h["clip"] < 0.5 for h in hessian.history) >= 2  # clipping acted: the coefficients include it
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    saved = hessian.hessian()
    for n, p in model.named_parameters():
        v = optimizer.state[p]["exp_avg_sq"].double()
        assert torch.allclose(v, ema[n], rtol=1e-5, atol=1e-12), n  # AdamW's EMA is what we think it is
        assert torch.allclose(saved[n].double(), v / weight, rtol=1e-3, atol=1e-30), n
    assert math.isclose(hessian.weight, weight, rel_tol=1e-3)
    del state


class _Logistic(nn.Module):
    """A two-class softmax regression in the shape the Trainer wants (loss from labels, logits out)."""

    def __init__(self, w):
        super().__init__()
        self.linear = nn.Linear(w.shape[1], 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(w)

    def forward(self, x, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.linear(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_second_moment_times_batch_size_is_the_fisher_at_the_optimum(tmp_path):
    """At the optimum (labels drawn from the model itself, learning rate ~0) E[g_k²] = F/B up to the finite-set
    correction: F̂ from the saved second moment matches F = mean_n (∇ℓ_n)² computed in float64 from the data set."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from gradmatch.fisher.optimizer import SaveHessianCallback

    g = torch.Generator().manual_seed(0)
    N, D, B = 4096, 3, 8
    w = torch.randn(2, D, generator=g)
    X = torch.randn(N, D, generator=g)
    p = torch.softmax(X @ w.T, -1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    # per-example gradient of CE w.r.t. W: (p − onehot(y)) xᵀ; its mean square over the data set, in float64
    r = (p.double() - nn.functional.one_hot(y, 2).double())
    F = (r.unsqueeze(2) * X.double().unsqueeze(1)).square().mean(0)
    mean_g = (r.unsqueeze(2) * X.double().unsqueeze(1)).mean(0)
    model = _Logistic(w)
    data = Dataset.from_dict({"x": X.tolist(), "labels": y.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=B, num_train_epochs=6,
                             learning_rate=1e-12, adam_beta2=0.999, max_grad_norm=0.0, report_to="none",
                             save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=lambda rows: {"x": torch.tensor([r["x"] for r in rows]),
                                                  "labels": torch.tensor([r["labels"] for r in rows])})
    hessian = SaveHessianCallback(trainer, tmp_path / "out", num_train_examples=N)
    trainer.add_callback(hessian)
    trainer.train()
    F_hat = hessian.hessian()["linear.weight"].double()
    # E[g_k²] for a batch of B drawn without replacement: (F − ḡ²)/B · (N − B)/(N − 1) + ḡ²
    expected = ((F - mean_g ** 2) / B * (N - B) / (N - 1) + mean_g ** 2) * B
    ratio = F_hat / expected
    assert 0.9 < float(ratio.mean()) < 1.1, ratio
    assert float((ratio - 1).abs().max()) < 0.3, ratio
    # the conversion's factor: the bias-corrected second moment times B (constant batches, no clipping)
    steps = hessian.steps
    v = trainer.optimizer.state[model.linear.weight]["exp_avg_sq"].double()
    assert torch.allclose(F_hat, B * v / (1 - 0.999 ** steps), rtol=1e-4)
    written = tmp_path / "out" / "hessian"
    record = json.loads((written / "fisher.json").read_text())
    assert record["estimator"] == "adam" and record["num_examples"] == N and record["steps"] == steps


def test_train_writes_the_hessian_beside_the_model(tmp_path):
    """`gradmatch train` with save_hessian: adam — OUT/hessian/ loads as the model's architecture, its record names
    the written weights (the merge's ownership check passes), and a merge reads the model folder as its Hessian."""
    from gradmatch.checkpoints import folder_fingerprint
    from gradmatch.train import train

    parent = make_tiny_bert(tmp_path / "bert", hidden=8, layers=1)
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": i % 2} for i in range(12)]
    data = write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    out = train({"model_name_or_path": str(parent), "dataset_name": str(data), "output_dir": str(tmp_path / "child"),
                 "save_hessian": "adam", "per_device_train_batch_size": 4, "num_train_epochs": 2}, quiet=True)
    record = json.loads((out / "hessian" / "fisher.json").read_text())
    assert record["estimator"] == "adam" and record["num_examples"] == 12 and record["steps"] == 6
    assert record["weights_fingerprint"] == folder_fingerprint(out)
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["hessian"] == "adam"
    from transformers import AutoModelForSequenceClassification

    H = AutoModelForSequenceClassification.from_pretrained(out / "hessian")
    values = torch.cat([p.detach().reshape(-1) for p in H.parameters()])
    assert bool((values >= 0).all()) and float(values.max()) > 0

    # the parent trains with its Hessian too; a merge takes each model folder as its Hessian and checks ownership
    parent2 = train({"model_name_or_path": str(parent), "dataset_name": str(data), "output_dir": str(tmp_path / "p2"),
                     "save_hessian": "adam", "per_device_train_batch_size": 4, "num_train_epochs": 1, "seed": 3},
                    quiet=True)
    child2 = train({"model_name_or_path": str(parent2), "dataset_name": str(data), "output_dir": str(tmp_path / "c2"),
                    "save_hessian": "adam", "per_device_train_batch_size": 4, "num_train_epochs": 1}, quiet=True)
    from gradmatch.merge import merge

    merge({"method": "gradient_matching", "base": str(parent2), "base_hessian": str(parent2),
           "models": [{"model": str(child2), "hessian": str(child2), "weight": 1.0}]}, tmp_path / "merged",
          progress=False)
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record  # T = 1, α = 1 gives the child back (SPEC §1)
    from safetensors.torch import load_file

    got, want = load_file(tmp_path / "merged" / "model.safetensors"), load_file(child2 / "model.safetensors")
    for name in want:
        assert torch.allclose(got[name].float(), want[name].float(), rtol=1e-5, atol=1e-6), name
    import shutil

    shutil.copytree(out / "hessian", tmp_path / "stray" / "hessian")  # the child's Hessian paired with the other child
    from gradmatch.errors import UserError

    with pytest.raises(UserError, match="computed on another model"):
        merge({"method": "gradient_matching", "base": str(parent2), "base_hessian": str(parent2),
               "models": [{"model": str(child2), "hessian": str(tmp_path / "stray"), "weight": 1.0}]},
              tmp_path / "merged2", progress=False)


def test_save_hessian_refusals(tmp_path):
    from gradmatch.config.run import load_train_config
    from gradmatch.errors import UserError

    base = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o"}
    with pytest.raises(UserError, match="needs optimizer_name IVON"):
        load_train_config({**base, "save_hessian": "ivon"})
    with pytest.raises(UserError, match="lora"):
        load_train_config({**base, "save_hessian": "adam", "lora": {"r": 2}})
    with pytest.raises(UserError, match="save_hessian"):
        load_train_config({**base, "save_hessian": "fisher"})
