"""Data loading: presets, local files, split syntax (agreeing with `datasets`), digits domains, encoding."""

from __future__ import annotations


import numpy as np
import pytest

from gradmatch import UserError
from gradmatch.data import load_split, save_split
from gradmatch.kinds import get_kind

TEXT, IMAGE = get_kind("text-classification"), get_kind("image-classification")
from conftest import write_jsonl as _write_jsonl




@pytest.fixture
def small_folder(tmp_path):
    folder = tmp_path / "toy"
    _write_jsonl(folder / "train.jsonl", [{"text": f"train example {i}", "label": i % 2} for i in range(40)])
    _write_jsonl(folder / "test.jsonl", [{"text": f"test example {i}", "label": (i // 3) % 2} for i in range(12)])
    return folder


SPECS = ["train", "test", "train[:20%]", "train[10:25]", "train[-7:]", "train[10%:35%]", "train[:33%]+test[5:9]",
         "test[:50%](closest)", "train[:-30]"]


@pytest.mark.parametrize("spec", SPECS)
def test_split_slicing_agrees_with_datasets(small_folder, spec):
    import datasets

    files = {"train": str(small_folder / "train.jsonl"), "test": str(small_folder / "test.jsonl")}
    expected = datasets.load_dataset("json", data_files=files, split=spec)
    got = load_split(str(small_folder), spec)
    assert list(got["text"]) == list(expected["text"])
    assert list(got["label"]) == list(expected["label"])


def test_preset_slice_of_the_local_root_agrees_with_datasets(sentiment_root):
    import datasets

    spec = "test[100:600]"
    expected = datasets.load_dataset("json", data_files={"test": str(sentiment_root / "rotten_tomatoes" / "test.jsonl")},
                                     split=spec)
    got = load_split("rotten_tomatoes", spec, data_dir=sentiment_root)
    assert len(got) == 500
    assert list(got["text"]) == list(expected["text"]) and list(got["label"]) == list(expected["label"])


def test_data_root_from_environment(sentiment_root, monkeypatch):
    monkeypatch.setenv("GRADMATCH_DATA_DIR", str(sentiment_root))
    ds = load_split("sst2", "test[:4]")
    assert len(ds) == 4 and ds.column_names == ["text", "label"]
    assert set(list(ds["label"])) <= {0, 1}


def test_out_of_range_split_is_an_error(small_folder):
    with pytest.raises(UserError, match=r"out of range.*12 rows"):
        load_split(str(small_folder), "test[100:600]")
    with pytest.raises(UserError, match="out of range"):
        load_split(str(small_folder), "test[:13]")


def test_bad_split_names_and_specs(small_folder):
    with pytest.raises(UserError, match=r"no split 'validation' \(available: test, train\)"):
        load_split(str(small_folder), "validation")
    with pytest.raises(UserError, match="invalid split"):
        load_split(str(small_folder), "train[:10")
    with pytest.raises(UserError, match="less than 100 elements"):
        load_split(str(small_folder), "train[:50%](pct1_dropremainder)")
    with pytest.raises(UserError, match="is empty"):
        load_split(str(small_folder), "train[5:5]")


def test_unknown_preset_and_missing_paths(tmp_path):
    with pytest.raises(UserError, match="unknown data set 'imbd'"):
        load_split("imbd", "train")
    with pytest.raises(UserError, match="does not exist"):
        load_split(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(UserError, match="has no folder yelp_polarity"):
        load_split("yelp_polarity", "train", data_dir=tmp_path)


def test_unreadable_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        load_split(str(empty), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": oops\n')
    with pytest.raises(UserError, match="cannot read data file .*bad.jsonl"):
        load_split(str(bad), "train")
    nolabel = _write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a"}])
    assert load_split(str(nolabel), "train").column_names == ["text"]  # a language-modelling corpus
    with pytest.raises(UserError, match="no 'label' column"):
        TEXT.check_data(load_split(str(nolabel), "train"), "nolabel", "a classifier")


def test_labels_are_checked(tmp_path):
    path = _write_jsonl(tmp_path / "three.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    assert load_split(str(path), "train", num_labels=3)["label"] == [0, 2]
    with pytest.raises(UserError, match=r"three.jsonl: label 2 is outside 0..1"):
        load_split(str(path), "train", num_labels=2)
    neg = _write_jsonl(tmp_path / "neg.jsonl", [{"text": "a", "label": -1}])
    with pytest.raises(UserError, match="negative"):
        load_split(str(neg), "train")


def test_csv_file_reads_every_split_name(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",1\nbad,0\nfine,1\n')
    ds = load_split(str(path), "whatever[1:]")
    assert list(ds["text"]) == ["bad", "fine"] and list(ds["label"]) == [0, 1]


def test_joined_data_sets_for_the_multitask_baseline(small_folder, sentiment_root):
    joined = load_split(f"{small_folder};rotten_tomatoes", "train[:5];test[:3]", data_dir=sentiment_root)
    first = load_split(str(small_folder), "train[:5]")
    second = load_split("rotten_tomatoes", "test[:3]", data_dir=sentiment_root)
    assert list(joined["text"]) == list(first["text"]) + list(second["text"])
    same = load_split(f"{small_folder};{small_folder}", "test[:2]")
    assert len(same) == 4
    with pytest.raises(UserError, match="has 3 parts"):
        load_split(f"{small_folder};{small_folder}", "train;train;train")


def test_hub_columns_of_presets_are_mapped():
    import datasets

    from gradmatch.data import _standardise

    amazon = datasets.Dataset.from_dict({"label": [1, 0], "title": ["Great CD", "Meh"], "content": ["Loved it.", "No."]})
    out = _standardise(amazon, "amazon_polarity", "amazon_polarity")
    assert list(out["text"]) == ["Great CD Loved it.", "Meh No."] and out.column_names == ["text", "label"]
    sst2 = datasets.Dataset.from_dict({"idx": [0], "sentence": ["a gem"], "label": [1]})
    assert _standardise(sst2, "sst2", "sst2")["text"] == ["a gem"]


def test_original_loading_script_paths_and_aliases_name_presets(sentiment_root):
    a = load_split("/code/merging/datasets/rotten_tomatoes.py", "test[:3]", config_name="classification",
                   data_dir=sentiment_root)
    b = load_split("rotten_tomatoes", "test[:3]", data_dir=sentiment_root)
    assert list(a["text"]) == list(b["text"])
    assert len(load_split("yelp", "train[:2]", data_dir=sentiment_root)) == 2


def test_save_split_round_trip(small_folder, tmp_path):
    ds = load_split(str(small_folder), "train[3:9]")
    out = save_split(ds, tmp_path / "saved")
    back = load_split(str(out), "train")
    assert list(back["text"]) == list(ds["text"]) and list(back["label"]) == list(ds["label"])
    with pytest.raises(UserError, match="already exists"):
        save_split(ds, out)


def test_digits_domains():
    orig_train = load_split("digits-original", "train")
    orig_test = load_split("digits-original", "test")
    assert (len(orig_train), len(orig_test)) == (1200, 597)
    assert sorted(set(list(orig_train["label"]))) == list(range(10))
    rows = range(5)
    orig = [np.asarray(orig_train[i]["image"]) for i in rows]
    assert orig[0].shape == (8, 8) and orig[0].dtype == np.uint8
    rot = load_split("digits-rot90", "train[:5]")
    inv = load_split("digits-inverted", "train[:5]")
    flip = load_split("digits-hflip", "train[:5]")
    shift = load_split("digits-shift", "train[:5]")
    for i in rows:
        np.testing.assert_array_equal(np.asarray(rot[i]["image"]), np.rot90(orig[i]))
        np.testing.assert_array_equal(np.asarray(inv[i]["image"]), 255 - orig[i])
        np.testing.assert_array_equal(np.asarray(flip[i]["image"]), orig[i][:, ::-1])
        np.testing.assert_array_equal(np.asarray(shift[i]["image"])[:, 2:], orig[i][:, :-2])
        assert not np.asarray(shift[i]["image"])[:, :2].any()
    assert list(rot["label"]) == list(orig_train["label"])[:5]
    # deterministic: a second load gives the same split
    assert load_split("digits-original", "test")["label"] == list(orig_test["label"])


def test_encode_text_truncates_and_collator_pads(minilm_path, small_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    ds = load_split(str(small_folder), "train[:4]")
    long = ds.map(lambda r: {"text": r["text"] + " word" * 50})
    enc = TEXT.encode(long, tok, 16)
    assert set(enc.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert all(len(ids) == 16 for ids in enc["input_ids"])
    assert enc["labels"] == list(ds["label"])
    short = TEXT.encode(ds, tok, 16)
    batch = TEXT.collator(tok)([short[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == list(ds["label"])
    assert batch["input_ids"][0, 0].item() == tok.cls_token_id
    with pytest.raises(UserError, match="outside"):
        TEXT.check_labels(ds, "given", 1)


def test_encode_images():
    from gradmatch.models import load_model

    _, processor = load_model("vit-digits", seed=0)
    ds = load_split("digits-inverted", "test[:6]")
    enc = IMAGE.encode(ds, processor, 128)
    batch = IMAGE.collator(processor)([enc[i] for i in range(6)])
    assert tuple(batch["pixel_values"].shape) == (6, 1, 8, 8)
    expected = np.asarray(ds[0]["image"], dtype=np.float32) / 255.0 * 2 - 1
    np.testing.assert_allclose(batch["pixel_values"][0, 0].numpy(), expected, atol=1e-5)
    assert batch["labels"].tolist() == list(ds["label"])


def test_presets_without_a_root_go_to_the_hub(monkeypatch):
    """Offline (as in these tests) the hub is out of reach: one clear error that names the local way."""
    monkeypatch.delenv("GRADMATCH_DATA_DIR", raising=False)
    with pytest.raises(UserError, match=r"cannot load data set imdb from the hub.*--data-dir"):
        load_split("imdb", "train[:5]")
    with pytest.raises(UserError, match="cannot load data set someone/data from the hub"):
        load_split("someone/data", "train")
