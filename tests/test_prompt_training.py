"""`gradmatch train` with ``prompt:``: a causal LM trained on an lm-eval task's own template — the pairs are the
harness's own requests for the correct choice, tokenised as the harness tokenises them, the loss on the answer."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_lm, write_jsonl
from gradmatch import UserError
from gradmatch.harness import training_pairs
from gradmatch.train import train

pytestmark = pytest.mark.slow

ROWS = [{"text": t, "label": y} for t, y in [
    ("a wonderful , moving film", 1), ("dull and far too long", 0), ("the best cast of the year", 1),
    ("i want my money back", 0), ("a delight from start to finish   ", 1), ("painful dialogue , silly ending", 0)]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("prompt") / "lm", family="llama")


def test_pairs_are_the_harness_requests_for_the_correct_choice(tmp_path):
    """The harness's own task object builds its requests for every row; the pair trained on is the gold one."""
    from lm_eval.tasks import TaskManager

    from gradmatch.harness import PACKAGED_DIR

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    folder = tmp_path / "tasks"
    folder.mkdir()
    for path in PACKAGED_DIR.glob("*.yaml"):
        (folder / path.name).write_text(path.read_text().replace("${data_root}/sst2/test.jsonl", str(data)))
    task = TaskManager(include_path=str(folder), include_defaults=False).load(["sentiment_sst2"])["tasks"]["sentiment_sst2"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    gold = {}
    for instance in task.instances:
        if instance.idx == instance.doc["label"]:
            gold[instance.doc_id] = instance.arguments
    pairs = training_pairs("sentiment_sst2", ROWS)
    assert pairs == [gold[i] for i in range(len(ROWS))]
    assert pairs[0] == ("Review: a wonderful , moving film\nQuestion: Is this review negative or positive?\nAnswer:",
                        " positive")


def test_tokens_are_the_harness_encoding_and_the_loss_is_on_the_answer(lm):
    """Labels are -100 but for the continuation's tokens, which are the harness's own `_encode_pair` split."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from gradmatch.kinds import get_kind

    tok = AutoTokenizer.from_pretrained(lm)
    pairs = training_pairs("sentiment_sst2", ROWS) + [("Context with a trailing space ", "answer")]
    harness = HFLM(pretrained=str(lm), device="cpu", batch_size=1)
    encoded = get_kind("causal-lm").encode_pairs(pairs, tok, 512)
    for (context, continuation), row in zip(pairs, encoded):
        ctx, cont = harness._encode_pair(context, continuation)
        assert row["input_ids"] == ctx + cont
        assert row["labels"] == [-100] * len(ctx) + cont
    as_text = get_kind("causal-lm").encode_pairs(pairs, tok, 512, loss="text")
    assert all(r["labels"] == r["input_ids"] for r in as_text)
    cut = get_kind("causal-lm").encode_pairs(pairs[:1], tok, 5)[0]  # too long: the last tokens, the answer kept
    full = encoded[0]
    assert cut["input_ids"] == full["input_ids"][-5:] and cut["labels"] == full["labels"][-5:]


def test_the_first_logged_loss_is_the_answer_tokens_mean_nll(lm, tmp_path):
    """One step on one batch of every row: the logged loss is the parent's mean NLL of the answer tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    out = train({"model_name_or_path": str(lm), "dataset_name": str(data.parent), "output_dir": str(tmp_path / "child"),
                 "kind": "causal-lm", "per_device_train_batch_size": len(ROWS), "max_steps": 1, "logging_steps": 1,
                 "learning_rate": 1e-3, "prompt": {"task": "sentiment_sst2"}}, quiet=True)
    meta = json.loads((out / "training_metadata.json").read_text())
    tok = AutoTokenizer.from_pretrained(lm)
    model = AutoModelForCausalLM.from_pretrained(lm).eval()
    total, count = 0.0, 0
    for context, answer in training_pairs("sentiment_sst2", ROWS):
        context = context.rstrip()
        whole = tok(context + answer)["input_ids"]
        start = len(tok(context)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        for i in range(start, len(whole)):
            total -= float(logp[i - 1, whole[i]])
            count += 1
    assert meta["loss_history"][0] == pytest.approx(total / count, rel=1e-4)
    assert meta["config"]["prompt"] == {"task": "sentiment_sst2", "include_path": None, "loss": "answer"}
    assert meta["num_train_examples"] == len(ROWS)


@pytest.mark.parametrize("case", ["classifier", "unknown task", "not multiple choice", "rows lack a column"])
def test_bad_prompt_is_one_line_and_nothing_written(lm, tiny_bert, tmp_path, case):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", ROWS if case != "rows lack a column"
                       else [{"text": r["text"]} for r in ROWS])
    prompt: dict = {"task": "sentiment_sst2"}
    model, expected = str(lm), {"classifier": "needs a causal language model", "unknown task": "unknown task",
                                "not multiple choice": "is a generate_until task",
                                "rows lack a column": "training row 0"}[case]
    if case == "classifier":
        model = str(tiny_bert)
    elif case == "unknown task":
        prompt["task"] = "sentiment_nowhere"
    elif case == "not multiple choice":
        folder = tmp_path / "tasks"
        folder.mkdir()
        (folder / "gen.yaml").write_text("task: gen\ndataset_path: json\noutput_type: generate_until\ntest_split: test\n"
                                         "doc_to_text: '{{text}}'\ndoc_to_target: '{{label}}'\n")
        prompt = {"task": "gen", "include_path": str(folder)}
    config = {"model_name_or_path": model, "dataset_name": str(data.parent), "output_dir": str(tmp_path / "out"),
              "max_steps": 1, "prompt": prompt}
    if case != "classifier":
        config["kind"] = "causal-lm"
    with pytest.raises(UserError, match=expected):
        train(config, quiet=True)
    assert not (tmp_path / "out").exists()
