"""IVON (ivon-opt) as the optimizer of training and its Hessian: the flat state read back under the model's names,
the Trainer's sampling, accumulation and posterior mean, the quantity on a logistic regression against the exact
mean per-example Hessian in float64, and the missing state."""

from __future__ import annotations

import math

import ivon
import pytest
import torch
from torch import nn

from gradmatch import UserError
from gradmatch.config.run import load_train_config
from gradmatch.fisher.ivon import (
    DEFAULT_BETA2, QUANTITY, IVONTrainer, ivon_beta2, ivon_hessian, ivon_metadata, make_ivon, unwrap_ivon,
)
from conftest import LM_CORPUS, make_tiny_bert, make_tiny_lm, write_jsonl


def _config(**overrides):
    return load_train_config({"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o",
                              "optimizer_name": "IVON", "learning_rate": 0.1, **overrides})


class Tiny(nn.Module):
    """Parameters of four shapes, one frozen, one unused by forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(2, 2))

    def forward(self, ids):
        return self.head(self.norm(self.frozen(self.embed(ids).mean(1))))


def _steps(model, optimizer, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, labels = torch.randint(0, 7, (8, 4), generator=g), torch.randint(0, 2, (8,), generator=g)
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(ids), labels).backward()
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        optimizer.step()


# --------------------------------------------------------------------------- (a) the flat state, unflattened


def test_hessian_is_ivons_flat_state_under_the_models_names():
    torch.manual_seed(0)
    model = Tiny()
    params = dict(model.named_parameters())
    # two groups in an order of our own, the frozen layer held by IVON (zero gradients, its own entries)
    groups = [{"params": [params["head.weight"], params["frozen.weight"], params["embed.weight"]]},
              {"params": [params["norm.bias"], params["unused"], params["head.bias"], params["norm.weight"]],
               "weight_decay": 0.0}]
    optimizer = ivon.IVON(groups, lr=0.1, ess=100.0, hess_init=0.5, beta2=0.9)
    _steps(model, optimizer)
    hessian = ivon_hessian(optimizer, model)

    assert list(hessian) == list(params)  # every parameter, in the model's order
    for name, p in params.items():
        assert hessian[name].shape == p.shape and hessian[name].dtype == torch.float32
        assert hessian[name].device.type == "cpu"
    for group in optimizer.param_groups:
        names = [n for p in group["params"] for n, q in params.items() if q is p]
        assert torch.equal(torch.cat([hessian[n].flatten() for n in names]), group["hess"])
    assert not torch.equal(hessian["head.weight"], torch.full((2, 3), 0.5))  # it moved
    assert "frozen.bias" in hessian and torch.equal(hessian["frozen.bias"], torch.zeros(3))  # not held: zeros


def test_make_ivon_holds_the_trainable_parameters_only():
    torch.manual_seed(0)
    model = Tiny()
    cfg = _config(weight_decay=1e-4, beta1=0.8, ivon={"hess_init": 0.25, "mc_samples": 2, "clip_radius": 0.5})
    optimizer = make_ivon(model, cfg, num_train_examples=123)
    trainable = [p for p in model.parameters() if p.requires_grad]
    (group,) = optimizer.param_groups
    assert len(group["params"]) == len(trainable) and all(a is b for a, b in zip(group["params"], trainable))
    assert (group["lr"], group["ess"], group["hess_init"]) == (0.1, 123.0, 0.25)
    assert (group["beta1"], group["weight_decay"]) == (0.8, 1e-4)
    assert (group["clip_radius"], optimizer.mc_samples, group["beta2"]) == (0.5, 2, DEFAULT_BETA2)
    frozen = model.frozen.weight.detach().clone()
    _steps(model, optimizer)
    hessian = ivon_hessian(optimizer, model)
    assert torch.equal(torch.cat([hessian[n].flatten() for n, p in model.named_parameters() if p.requires_grad]),
                       group["hess"])
    assert torch.equal(hessian["frozen.weight"], torch.zeros(3, 3))
    assert torch.equal(model.frozen.weight, frozen)  # never perturbed by a sample, never updated
    assert make_ivon(model, _config(ivon={"ess": 5.0}), 123).param_groups[0]["ess"] == 5.0


def test_beta2_comes_from_the_ivon_block_then_the_train_config_then_the_default():
    assert ivon_beta2(_config(beta2=0.95, ivon={"beta2": 0.9})) == 0.9
    assert ivon_beta2(_config(beta2=0.95)) == 0.95
    assert ivon_beta2(_config()) == DEFAULT_BETA2  # the train config's own default (AdamW's 0.999) is not taken


def test_metadata_says_what_the_tensors_are():
    model = Tiny()
    optimizer = make_ivon(model, _config(ivon={"hess_init": 0.25}), 50)
    _steps(model, optimizer, steps=2)
    meta = ivon_metadata(optimizer, steps=2, num_train_examples=50)
    assert meta["estimator"] == "ivon" and meta["num_examples"] == 50 and meta["ess"] == 50.0
    assert (meta["hess_init"], meta["beta2"], meta["steps"], meta["mc_samples"]) == (0.25, DEFAULT_BETA2, 2, 1)
    assert meta["quantity"] == QUANTITY and "mean per-example loss" in QUANTITY


# --------------------------------------------------------------------------- (d) no state


def test_an_optimizer_that_never_stepped_has_no_hessian():
    model = Tiny()
    optimizer = make_ivon(model, _config(), 10)
    with pytest.raises(UserError, match=r"IVON state has no Hessian: .*trained 0 steps\?") as info:
        ivon_hessian(optimizer, model)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="not an IVON optimizer: AdamW"):
        ivon_hessian(torch.optim.AdamW(model.parameters()), model)
    other = Tiny()
    _steps(model, optimizer, steps=1)
    with pytest.raises(UserError, match="does not have: the optimizer belongs to another model"):
        ivon_hessian(optimizer, other)


# --------------------------------------------------------------------------- (b) the Trainer


def _polarity(path, n=40):
    words = ["movie", "plot", "film", "actor", "story", "scene", "music"]
    rows = [{"text": f"the {words[i % 7]} was {'great' if i % 2 else 'awful'}", "label": i % 2} for i in range(n)]
    write_jsonl(path / "train.jsonl", rows)
    return path


def _trainer(model_dir, data_dir, out, trainer_cls=IVONTrainer, callbacks=(), **overrides):
    from gradmatch.data import load_split
    from gradmatch.models import kind_of, load_model
    from gradmatch.train import _training_arguments

    config = {"model_name_or_path": str(model_dir), "dataset_name": str(data_dir), "output_dir": str(out),
              "max_input_length": 16, "logging_steps": 5, "seed": 0, "dropout": 0.0, **overrides}
    cfg = load_train_config(config)
    kind = kind_of(str(model_dir), None)
    model, processor = load_model(str(model_dir), kind=kind, dropout=0.0)
    data = kind.encode(load_split(str(data_dir), "train"), processor, 16)
    args = _training_arguments(cfg, out, quiet=True, has_eval=False)
    common = dict(model=model, args=args, data_collator=kind.collator(processor), train_dataset=data,
                  eval_dataset=data, processing_class=processor, callbacks=list(callbacks))
    if trainer_cls is IVONTrainer:
        return IVONTrainer(**common, train_config=cfg, num_train_examples=len(data))
    return trainer_cls(**common)


@pytest.fixture(scope="module")
def digits_parent(tmp_path_factory):
    """The demo's tiny ViT trained briefly with AdamW on original digits: a parent to fine-tune (SGD-sized steps
    such as IVON's do not train a ViT or the tiny BERT from scratch in a few dozen steps)."""
    from gradmatch.data import load_split, save_split
    from gradmatch.train import train

    root = tmp_path_factory.mktemp("digits")
    parent = train({"model_name_or_path": "vit-digits", "dataset_name": "digits-original",
                    "dataset_train_split": "train[:320]", "output_dir": str(root / "parent"), "num_train_epochs": 8,
                    "learning_rate": 3e-3, "per_device_train_batch_size": 32, "logging_strategy": "no", "seed": 0,
                    "lr_scheduler": "cosine", "warmup_steps": 4}, quiet=True)
    save_split(load_split("digits-rot90", "train[:320]"), root / "rot90")
    return parent, root / "rot90"


@pytest.mark.slow
def test_trainer_fine_tunes_and_keeps_the_posterior_mean(digits_parent, tmp_path):
    from transformers import AutoModelForImageClassification

    parent, data = digits_parent
    trainer = _trainer(parent, data, tmp_path / "run", optimizer_name="IVON", learning_rate=0.3,
                       num_train_epochs=4, per_device_train_batch_size=32, lr_scheduler="constant",
                       ivon={"ess": 32000, "hess_init": 0.1, "beta2": 0.95})
    trainer.train()
    history = [e for e in trainer.state.log_history if "loss" in e]
    losses = [e["loss"] for e in history]
    assert trainer.state.global_step == 40 and len(losses) == 8
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(e["grad_norm"] > 0 for e in history)  # the mean of the samples' norms (the Trainer's would be 0)
    optimizer = trainer.ivon
    assert optimizer.current_step == 40

    # outside a sample the parameters are the mean: evaluation and the saved model see it, not a draw
    mean = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    first = trainer.evaluate()["eval_loss"]
    assert trainer.evaluate()["eval_loss"] == first  # no noise in evaluation
    with optimizer.sampled_params():
        drawn = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert all(not torch.equal(drawn[n], mean[n]) for n in mean)
    assert all(torch.equal(p, mean[n]) for n, p in trainer.model.named_parameters())  # restored
    trainer.model.save_pretrained(tmp_path / "saved")
    saved = dict(AutoModelForImageClassification.from_pretrained(tmp_path / "saved").named_parameters())
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    held = optimizer.param_groups[0]["params"]
    assert len(held) == len(saved)
    assert torch.equal(torch.cat([saved[names[id(p)]].flatten() for p in held]),
                       torch.cat([p.detach().flatten() for p in held]))  # the saved model is IVON's mean
    hessian = ivon_hessian(trainer.optimizer, trainer.model)
    assert list(hessian) == list(saved)
    assert all(float(h.std()) > 0 for h in hessian.values() if h.numel() > 1)  # moved off hess_init entry by entry


class _GradientAtStep:
    """Records, just before the optimizer's first step, IVON's averaged gradient or the Trainer's accumulated one."""

    from transformers import TrainerCallback as _Base

    class Callback(_Base):
        def __init__(self):
            self.gradient = None

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
            if self.gradient is not None:
                return
            try:
                self.gradient = unwrap_ivon(optimizer).state["avg_grad"].detach().clone()
            except UserError:
                self.gradient = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                           for p in model.parameters() if p.requires_grad])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "causal-lm"])
def test_accumulated_samples_average_to_the_trainers_gradient(tmp_path, kind):
    """With the noise negligible, IVON's average over (micro-batch, sample) pairs is the gradient AdamW would have
    had — including a causal LM's loss weighted by token counts across micro-batches of different lengths."""
    from transformers import Trainer

    if kind == "classifier":
        model_dir, data = make_tiny_bert(tmp_path / "bert"), _polarity(tmp_path / "polarity", n=12)
    else:
        model_dir = make_tiny_lm(tmp_path / "lm")
        data = tmp_path / "corpus"
        write_jsonl(data / "train.jsonl", [{"text": t} for t, _ in LM_CORPUS])
    common = dict(max_steps=1, per_device_train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.0,
                  lr_scheduler="constant")
    grads = {}
    for name, cls, extra in [("ivon", IVONTrainer, dict(optimizer_name="IVON", learning_rate=0.1,
                                                         ivon={"ess": 1e18, "hess_init": 1.0, "mc_samples": 2})),
                             ("adamw", Trainer, dict(learning_rate=1e-3))]:
        callback = _GradientAtStep.Callback()
        trainer = _trainer(model_dir, data, tmp_path / name, trainer_cls=cls, callbacks=[callback], **common, **extra)
        trainer.train()
        grads[name] = callback.gradient
    torch.testing.assert_close(grads["ivon"], grads["adamw"], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- (c) what the quantity is


def test_hessian_approaches_the_mean_per_example_hessian_of_a_logistic_regression(one_thread):
    """Full-batch IVON started at the optimum of a logistic regression whose diagonal Hessian spans three orders of
    magnitude: after 1500 steps (β2 = 0.99, so ~100 steps of memory) every entry of ``hess`` is within 25% of the
    mean per-example Hessian (1/N) Σ_n p_n(1 − p_n) x_nj² at the optimum, computed in float64 by Newton's method —
    which for this model is also the (sampled) Fisher, the quantity a merge reads. Price's estimator is unbiased for
    E_q[∇²ℓ]; the EMA's fluctuation is about √(1 − β2) = 10%."""
    g = torch.Generator().manual_seed(0)
    n, scales = 2000, torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * scales
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=torch.float64)), generator=g)
    theta = torch.zeros(4, dtype=torch.float64)
    for _ in range(30):  # Newton in float64
        p = torch.sigmoid(x @ theta)
        theta -= torch.linalg.solve((x * (p * (1 - p))[:, None]).T @ x / n, x.T @ (p - y) / n)
    p = torch.sigmoid(x @ theta)
    expected = ((p * (1 - p))[:, None] * x**2).mean(0)
    assert float(expected.max() / expected.min()) > 500

    torch.manual_seed(0)
    w = nn.Parameter(theta.float().clone())
    optimizer = ivon.IVON([w], lr=0.01, ess=float(n), hess_init=0.1, beta2=0.99, weight_decay=0.0)
    xf, yf = x.float(), y.float()
    for _ in range(1500):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(xf @ w, yf).backward()
        optimizer.step()
    model = nn.Module()
    model.w = w
    hess = ivon_hessian(optimizer, model)["w"].double()
    ratio = hess / expected
    assert torch.all((ratio > 0.75) & (ratio < 1.25)), ratio
    assert math.isclose(float(w.detach().double().sub(theta).abs().max()), 0.0, abs_tol=0.05)  # stayed near the optimum


@pytest.mark.slow
def test_gradmatch_train_with_ivon_writes_its_hessian_beside_the_model(digits_parent, tmp_path):
    """`gradmatch train` with optimizer_name IVON and save_hessian ivon: OUT/hessian/ holds IVON's Hessian (a model
    folder of the child's architecture), fisher.json names the estimator, N and the written weights, and the model
    folder holds the posterior mean (not a sample: two evaluations agree)."""
    import json

    from transformers import AutoModelForImageClassification

    from gradmatch.checkpoints import folder_fingerprint
    from gradmatch.train import train

    parent, data = digits_parent
    out = train({"model_name_or_path": str(parent), "dataset_name": str(data), "output_dir": str(tmp_path / "child"),
                 "optimizer_name": "IVON", "save_hessian": "ivon", "learning_rate": 0.3, "num_train_epochs": 2,
                 "per_device_train_batch_size": 32, "logging_strategy": "no", "seed": 0}, quiet=True)
    record = json.loads((out / "hessian" / "fisher.json").read_text())
    assert record["estimator"] == "ivon" and record["num_examples"] == 320 and record["ess"] == 320
    assert record["steps"] == 20 and record["hess_init"] == 1.0 and record["beta2"] == 0.99
    assert record["weights_fingerprint"] == folder_fingerprint(out)
    H = AutoModelForImageClassification.from_pretrained(out / "hessian")
    values = torch.cat([p.detach().reshape(-1) for p in H.parameters()])
    assert bool((values > 0).all()) and not torch.allclose(values, torch.ones_like(values))  # moved from hess_init
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["hessian"] == "ivon" and meta["config"]["optimizer_name"] == "IVON"
