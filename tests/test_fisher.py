"""Fisher estimates: batched exact per-example squares equal a batch-size-1 loop; sampling; output layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradmatch.errors import UserError
from gradmatch.fisher import (FisherAccumulator, estimate_fisher, example_uniform, model_fingerprint, run_fisher,
                              sample_labels)

TEXTS = [
    "a fine film",
    "the worst thing I have ever seen in my whole life, truly awful from start to end",
    "ok",
    "bad bad bad bad",
    "meh, it was fine I guess, though the second half drags",
    "x",
    "an utterly charming, clever and warm comedy",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP contention


def loop_fisher(model, examples, estimator, seed):
    """The original's method, written out here: one unpadded example at a time, square its full gradient."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    for index, (inputs, label) in enumerate(examples):
        logits = model(**inputs).logits
        y = label if estimator == "empirical" else int(sample_labels(logits, [index], seed)[0])
        log_p = torch.log_softmax(logits, -1)[0, y]
        grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                sums[k] += g.square()
    return {k: s / len(examples) for k, s in sums.items()}


def assert_fisher_close(batched, reference, rtol=1e-5):
    """Elementwise within ``rtol`` relative; entries that are zero in exact arithmetic (e.g. attention key
    biases) are rounding noise, so an absolute floor of float32 epsilon times the largest entry applies."""
    assert batched.keys() == reference.keys()
    scale = max(float(v.abs().max()) for v in reference.values())
    assert scale > 0
    for k in reference:
        assert batched[k].dtype == torch.float32
        torch.testing.assert_close(batched[k], reference[k], rtol=rtol, atol=1e-7 * scale, msg=k)


def text_batches(tokenizer, labels, batch_size):
    batches = []
    for start in range(0, len(TEXTS), batch_size):
        enc = dict(tokenizer(TEXTS[start:start + batch_size], padding=True, return_tensors="pt"))
        enc["labels"] = torch.tensor(labels[start:start + batch_size])
        enc["index"] = torch.arange(start, start + len(enc["labels"]))
        batches.append(enc)
    return batches


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from conftest import make_tiny_bert
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_tiny_bert(tmp_path_factory.mktemp("fisher") / "bert", seed=1, num_labels=3)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():  # a head that is not near-uniform, so the sampled labels vary
        model.classifier.weight.mul_(20)
    return model, AutoTokenizer.from_pretrained(path), path


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_batched_equals_batch_size_1_loop_on_padded_text(bert, estimator):
    model, tokenizer, _ = bert
    labels = [0, 2, 1, 1, 0, 2, 1]
    reference = loop_fisher(model, [(dict(tokenizer(t, return_tensors="pt")), y) for t, y in zip(TEXTS, labels)],
                            estimator, seed=7)
    # Variable lengths: every batch but one is padded; the padding must change nothing.
    batches = text_batches(tokenizer, labels, batch_size=3)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)
    batched = estimate_fisher(model, batches, estimator=estimator, seed=7, progress=False)
    assert_fisher_close(batched, reference)
    # Position, token-type and word embeddings are all covered and nonzero where used.
    assert batched["bert.embeddings.position_embeddings.weight"][0].abs().sum() > 0
    assert batched["bert.embeddings.token_type_embeddings.weight"][0].abs().sum() > 0
    assert batched["bert.embeddings.word_embeddings.weight"][0].abs().sum() == 0  # [PAD] is never updated
    # The batch size changes nothing either (sampled labels included).
    again = estimate_fisher(model, text_batches(tokenizer, labels, batch_size=5), estimator=estimator, seed=7,
                            progress=False)
    assert_fisher_close(again, batched)


def test_not_the_square_of_the_batch_gradient(bert):
    """Guard against the biased shortcut: (Σ_b g_b)² differs from Σ_b g_b²."""
    model, tokenizer, _ = bert
    batches = text_batches(tokenizer, [0, 1, 2, 0, 1, 2, 0], batch_size=7)
    fisher = estimate_fisher(model, batches, estimator="empirical", progress=False)
    b = batches[0]
    model.zero_grad()
    logits = model(**{k: v for k, v in b.items() if k not in ("labels", "index")}).logits
    torch.log_softmax(logits, -1).gather(1, b["labels"][:, None]).sum().backward()
    w = "classifier.weight"
    squared_batch = model.get_parameter(w).grad.square() / 7
    assert not torch.allclose(fisher[w], squared_batch, rtol=1e-2)
    model.zero_grad()


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_vit_with_conv_patches_and_cls_position_parameters(estimator):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=4)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_()
        model.classifier.weight.mul_(20)
    g = torch.Generator().manual_seed(1)
    pixels, labels = torch.randn(7, 1, 8, 8, generator=g), torch.randint(0, 4, (7,), generator=g)
    reference = loop_fisher(model, [({"pixel_values": pixels[i:i + 1]}, int(labels[i])) for i in range(7)],
                            estimator, seed=3)
    batches = [{"pixel_values": pixels[s:s + 4], "labels": labels[s:s + 4], "index": torch.arange(s, min(s + 4, 7))}
               for s in (0, 4)]
    batched = estimate_fisher(model, batches, estimator=estimator, seed=3, progress=False)
    assert_fisher_close(batched, reference)
    for name in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                 "vit.embeddings.patch_embeddings.projection.weight"):
        assert batched[name].abs().sum() > 0


class _Scaled(nn.Module):
    """A module type without a closed form (a direct parameter used elementwise)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return torch.tanh(x * self.scale)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _Tiny(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.s = _Scaled(6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 3)
        if tie:
            self.c = nn.Linear(5, 6)
            self.c.weight = self.a.weight

    def forward(self, x):
        return _Out(self.b(self.norm(self.s(self.a(x)))))


def test_unknown_module_types_fall_back_to_an_exact_method():
    torch.manual_seed(0)
    model = _Tiny()
    x, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    reference = loop_fisher(model, [({"x": x[i:i + 1]}, int(labels[i])) for i in range(6)], "sampled", seed=0)
    batched = estimate_fisher(model, [{"x": x[:4], "index": torch.arange(4)}, {"x": x[4:], "index": torch.arange(4, 6)}],
                              seed=0, progress=False)
    assert_fisher_close(batched, reference)
    assert all(p.requires_grad for p in model.parameters())  # state restored


def test_a_matrix_shared_by_two_layers_sums_its_uses_before_squaring():
    class Twice(nn.Module):  # one weight, two Linear layers that both run
        def __init__(self):
            super().__init__()
            self.a, self.c, self.b = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
            self.c.weight = self.a.weight

        def forward(self, x):
            return _Out(self.b(torch.tanh(self.c(torch.tanh(self.a(x))))))

    torch.manual_seed(0)
    model = Twice()
    x, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    reference = loop_fisher(model, [({"x": x[i:i + 1]}, int(labels[i])) for i in range(6)], "empirical", seed=0)
    batched = estimate_fisher(model, [{"x": x, "labels": labels, "index": torch.arange(6)}], estimator="empirical",
                              progress=False)
    assert_fisher_close(batched, reference)
    assert "c.weight" not in batched  # the shared matrix has one name (named_parameters'), like its checkpoint


def test_a_shared_parameter_without_a_closed_form_fails_loudly():
    model = _Tiny()
    model.norm.weight = model.s.scale  # LayerNorm weight shared with an elementwise parameter
    with pytest.raises(UserError, match="shared"):
        FisherAccumulator(model)


def test_sampled_labels_follow_the_model_distribution():
    probs = torch.tensor([0.2, 0.5, 0.3])
    n = 20000
    labels = sample_labels(probs.log().expand(n, 3), range(n), seed=11)
    freq = torch.bincount(labels, minlength=3).double() / n
    # 4.5 standard deviations of a binomial frequency at n = 20000 is below 0.0165.
    assert torch.allclose(freq, probs.double(), atol=0.0165), freq
    # Deterministic per (seed, example index): independent of batching, different for another seed.
    again = torch.cat([sample_labels(probs.log().expand(100, 3), range(s, s + 100), seed=11) for s in range(0, 1000, 100)])
    assert torch.equal(again, labels[:1000])
    assert not torch.equal(sample_labels(probs.log().expand(1000, 3), range(1000), seed=12), labels[:1000])
    assert example_uniform(11, 5) == example_uniform(11, 5) != example_uniform(11, 6)


def test_estimator_is_deterministic_and_checks_labels(bert):
    model, tokenizer, _ = bert
    batches = text_batches(tokenizer, [0, 1, 2, 0, 1, 2, 0], batch_size=4)
    one = estimate_fisher(model, batches, seed=5, progress=False)
    two = estimate_fisher(model, batches, seed=5, progress=False)
    assert all(torch.equal(one[k], two[k]) for k in one)
    other = estimate_fisher(model, batches, seed=6, progress=False)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    bad = text_batches(tokenizer, [0, 1, 3, 0, 1, 2, 0], batch_size=4)
    with pytest.raises(UserError, match="label 3 is outside the model's 3 classes"):
        estimate_fisher(model, bad, estimator="empirical", progress=False)
    with pytest.raises(UserError, match="no examples"):
        estimate_fisher(model, [], progress=False)
    model.train()  # eval mode while estimating, the caller's mode afterwards
    try:
        assert all(torch.equal(v, one[k]) for k, v in estimate_fisher(model, batches, seed=5, progress=False).items())
        assert model.training
    finally:
        model.eval()


def test_run_fisher_writes_a_model_folder_with_metadata(bert, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from gradmatch.data import load_split
    from gradmatch.kinds import get_kind

    _, tokenizer, path = bert
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(TEXTS)))
    out = run_fisher(str(path), str(data), "train", out=tmp_path / "out", estimator="empirical", batch_size=3,
                     max_examples=6, seed=2, progress=False)
    folder = out / "hessian"
    meta = json.loads((folder / "fisher.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert meta["estimator"] == "empirical" and meta["num_examples"] == 6 and meta["seed"] == 2
    assert meta["split"] == "train" and meta["dataset"] == str(data) and meta["max_length"] == 128
    assert meta["model_fingerprint"] == model_fingerprint(model)
    # Same numbers as the pure computation on the same examples.
    text = get_kind("text-classification")
    encoded = text.encode(load_split(str(data), "train"), tokenizer, 128)
    collate = text.collator(tokenizer)
    batches = [dict(collate([encoded[i] for i in range(s, min(s + 4, 6))])) for s in (0, 4)]
    expected = estimate_fisher(model, batches, estimator="empirical", progress=False)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        own = set(f.keys())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert names == own == set(dict(model.named_parameters()))
        for name in names:
            t = f.get_tensor(name)
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, expected[name], rtol=1e-5, atol=1e-12)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(loaded.classifier.weight, expected["classifier.weight"])


def test_run_fisher_on_an_image_classifier(tmp_path):
    from safetensors.torch import load_file
    from transformers import ViTConfig, ViTForImageClassification

    from gradmatch.data import load_split
    from gradmatch.kinds import get_kind
    from gradmatch.kinds.image_classification import default_image_processor

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    model = ViTForImageClassification(config)
    processor = default_image_processor(config)
    model.save_pretrained(tmp_path / "vit")
    processor.save_pretrained(tmp_path / "vit")
    out = run_fisher(str(tmp_path / "vit"), "digits-original", "train[:6]", out=tmp_path / "out", batch_size=4,
                     seed=1, progress=False)
    image = get_kind("image-classification")
    encoded = image.encode(load_split("digits-original", "train[:6]"), processor, 128)
    batch = dict(image.collator(processor)([encoded[i] for i in range(6)]))
    expected = estimate_fisher(model, [batch], seed=1, progress=False)
    # On disk: the names and shapes of the model's own checkpoint (transformers 5 renames ViT's modules in
    # memory and back on saving), so the Hessian pairs tensor by tensor with the model folder.
    written = load_file(out / "hessian" / "model.safetensors")
    own = load_file(tmp_path / "vit" / "model.safetensors")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in own.items()}
    assert all(v.dtype == torch.float32 for v in written.values())
    loaded = ViTForImageClassification.from_pretrained(out / "hessian")
    assert_fisher_close({k: p.detach() for k, p in loaded.named_parameters()}, expected)
    assert json.loads((out / "hessian" / "fisher.json").read_text())["num_examples"] == 6


def test_run_fisher_rejects_a_missing_gpu_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        run_fisher("unused", "unused", "train", out=tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


class _Twice(nn.Module):
    """ALBERT-style sharing: one layer applied twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return _Out(self.b(self.a(torch.tanh(self.a(x)))))


def test_a_module_run_twice_per_forward_fails_loudly():
    model = _Twice()
    with pytest.raises(UserError, match="module a runs more than once per forward pass"):
        estimate_fisher(model, [{"x": torch.randn(3, 4)}], progress=False)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed after the failure
