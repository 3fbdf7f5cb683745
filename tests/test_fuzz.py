"""Bounded fuzzing in CI: the safetensors header reader and the config readers, given structured or mutated
input, either read it consistently or refuse it with one UserError naming the file; never a traceback.
The long runs are tests/fuzz/fuzz_safetensors.py and tests/fuzz/fuzz_configs.py (docs/reliability.md)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))

from fuzz_targets import CORPUS, check_config, check_safetensors, mutate  # noqa: E402

from gradmatch.checkpoints import SAFETENSORS_DTYPES, read_safetensors_header  # noqa: E402
from gradmatch.config.experiment import load_experiment  # noqa: E402
from gradmatch.config.run import load_train_config  # noqa: E402
from gradmatch.errors import UserError  # noqa: E402
from gradmatch.merge import load_merge_config  # noqa: E402

SAFETENSORS_SEEDS = sorted((CORPUS / "safetensors").iterdir())
CONFIG_SEEDS = sorted((CORPUS / "config").iterdir())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def _file(header_bytes: bytes, data: bytes = b"") -> bytes:
    return len(header_bytes).to_bytes(8, "little") + header_bytes + data


# --------------------------------------------------------------------------- the seed corpus itself


@pytest.mark.parametrize("seed", SAFETENSORS_SEEDS, ids=[p.stem for p in SAFETENSORS_SEEDS])
def test_safetensors_seed_corpus(seed, tmp_path):
    valid = {"small_f32", "dtypes", "scalar_and_empty", "no_tensors", "bert_like"}
    assert check_safetensors(seed.read_bytes(), tmp_path) == ("ok" if seed.stem in valid else "rejected")


@pytest.mark.parametrize("seed", CONFIG_SEEDS, ids=[p.name for p in CONFIG_SEEDS])
def test_config_seed_corpus(seed, tmp_path):
    outcome = check_config(seed.read_bytes(), tmp_path / seed.name)
    accepted = {k for k, v in outcome.items() if v == "ok"}
    expected = {"merge.yaml": {"merge"}, "merge.json": {"merge"}, "ties.yaml": {"merge"}, "anchors.yaml": {"merge"},
                "train.json": {"train", "evaluate"}, "evaluate.yaml": {"train", "evaluate"},  # the original reused one dict for both
                "fisher.json": {"evaluate"}, "experiment.yaml": {"experiment"}}
    assert accepted == expected.get(seed.name, set()), outcome


# --------------------------------------------------------------------------- regressions the fuzzers found


@pytest.mark.parametrize("header, words", [
    (json.dumps({"a": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}).encode(), "unknown dtype"),
    (json.dumps({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}).encode(), "unknown dtype"),
    (json.dumps({"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}).encode(), "malformed"),
    (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}).encode(), "malformed"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"a":' * 50_000, "not valid JSON"),
])
def test_header_found_by_fuzzing_is_a_user_error(tmp_path, header, words):
    """These raised TypeError / OverflowError / RecursionError (a traceback) before the fixes."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(_file(header, bytes(8)))
    with pytest.raises(UserError, match=words) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["1: a\nmodel_name_or_path: m\n", "null: 3\n", "true: 1\nbase: x\n"])
def test_config_with_a_key_that_is_not_a_string(tmp_path, text):
    """A YAML key that is a number, null or boolean raised TypeError in the train/evaluate reader before the fix."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for reader in (load_train_config, load_merge_config, load_experiment):
        with pytest.raises(UserError, match="is not a name") as info:
            reader(path)
        assert str(path) in str(info.value)


def test_deeply_nested_shard_index_is_a_user_error(tmp_path):
    from gradmatch.checkpoints import Checkpoint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000)
    with pytest.raises(UserError, match="not a valid shard index"):
        Checkpoint(tmp_path)


# --------------------------------------------------------------------------- structured headers


_dims = st.lists(st.integers(0, 6), max_size=3)
_entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES)), st.text(max_size=4), st.integers(), st.none(),
                       st.lists(st.integers(), max_size=1)),
    "shape": st.one_of(_dims, st.lists(st.integers(-3, 1 << 62), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-2, 200), min_size=2, max_size=2),
                              st.lists(st.integers(0, 1 << 64), min_size=0, max_size=3), st.none()),
})


@st.composite
def consistent_files(draw):
    """Valid files built the way the format says: tensors laid out back to back, with random values."""
    names = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8),
                          unique=True, max_size=4))
    header, offset = {}, 0
    for name in names:
        if name == "__metadata__":
            continue
        code = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(_dims)
        size = SAFETENSORS_DTYPES[code][0]
        for d in shape:
            size *= d
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = draw(st.binary(min_size=offset, max_size=offset))
    body = json.dumps(header).encode()
    body += b" " * ((8 - len(body) % 8) % 8)  # safetensors pads the header to 8 bytes
    return _file(body, data)


@FUZZ
@given(data=consistent_files())
def test_valid_files_are_read_like_the_library_reads_them(tmp_path_factory, data):
    assert check_safetensors(data, tmp_path_factory.mktemp("st")) == "ok"


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), _entry, max_size=3), extra=st.integers(0, 64),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 1 << 40]))
def test_random_headers_are_read_or_refused(tmp_path_factory, header, extra, length_delta):
    body = json.dumps(header).encode()
    data = max(0, len(body) + length_delta).to_bytes(8, "little") + body + bytes(extra)
    check_safetensors(data, tmp_path_factory.mktemp("st"))


@FUZZ
@given(seed=st.sampled_from(SAFETENSORS_SEEDS), rng_seed=st.integers(0, 2**32 - 1))
def test_mutated_seed_files_are_read_or_refused(tmp_path_factory, seed, rng_seed):
    corpus = [p.read_bytes() for p in SAFETENSORS_SEEDS]
    data = mutate(seed.read_bytes(), random.Random(rng_seed), corpus)
    check_safetensors(data, tmp_path_factory.mktemp("st"))


# --------------------------------------------------------------------------- configs


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["../../etc", "/etc/passwd", "..", "a/b", "x" * 300]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=12)
_keys = st.sampled_from(["method", "base", "base_hessian", "models", "parameters", "model_name_or_path", "dataset_name",
                         "output_dir", "name", "parent", "children", "merges", "learning_rate", "lora", "seed",
                         "training", "resources", "weight", "model", "hessian", "alphas", "dataset"])


@FUZZ
@given(doc=st.dictionaries(_keys, _values, max_size=6), as_json=st.booleans())
def test_random_config_documents_are_read_or_refused(tmp_path_factory, doc, as_json):
    folder = tmp_path_factory.mktemp("cfg")
    if as_json:
        text, path = json.dumps(doc), folder / "config.json"
    else:
        text, path = yaml.safe_dump(doc, allow_unicode=True), folder / "config.yaml"
    check_config(text.encode(), path)


@FUZZ
@given(seed=st.sampled_from(CONFIG_SEEDS), rng_seed=st.integers(0, 2**32 - 1))
def test_mutated_seed_configs_are_read_or_refused(tmp_path_factory, seed, rng_seed):
    corpus = [p.read_bytes() for p in CONFIG_SEEDS]
    data = mutate(seed.read_bytes(), random.Random(rng_seed), corpus)
    check_config(data, tmp_path_factory.mktemp("cfg") / seed.name)


# --------------------------------------------------------------------------- properties of config parsing


_name = st.text(st.characters(codec="ascii"), min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(name=_name, merge_name=st.one_of(st.none(), _name))
def test_experiment_and_merge_names_never_leave_the_run_folder(name, merge_name):
    from pipeline_helpers import tiny

    merge = {"method": "task_arithmetic", **({"name": merge_name} if merge_name is not None else {})}
    try:
        exp = load_experiment(tiny(name=name, merges=[merge]))
    except UserError as exc:
        assert "name" in str(exc)
        return
    runs = Path("/r/runs")
    assert (runs / exp.name).resolve().parent == runs and not Path(exp.name).is_absolute()
    label = exp.merges[0].label
    assert (runs / "merges" / label).resolve().parent == runs / "merges"


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.one_of(st.none(), st.floats(-10, 10)), min_size=1, max_size=5),
       scales=st.lists(st.one_of(st.none(), st.floats(0, 1e6)), min_size=5, max_size=5),
       via_parameters=st.lists(st.booleans(), min_size=5, max_size=5),
       method=st.sampled_from(["task_arithmetic", "gradient_matching", "ties", "dare"]), delta=st.floats(0, 1))
def test_merge_config_weights_and_scales_round_trip(weights, scales, via_parameters, method, delta):
    """α_t and N_t given as keys or under per-model parameters come back unchanged, in order; defaults 1.0 / None."""
    models = []
    for i, w in enumerate(weights):
        entry = {"model": f"child{i}", "hessian": f"h{i}"}
        values = {k: v for k, v in (("weight", w), ("hessian_scale", scales[i])) if v is not None}
        if via_parameters[i]:
            entry["parameters"] = values
        else:
            entry.update(values)
        models.append(entry)
    doc = {"method": method, "base": "p", "base_hessian": "h0", "models": models}
    if method == "gradient_matching":
        doc["parameters"] = {"delta_0": delta}
    cfg = load_merge_config(doc)
    assert cfg.weights() == [1.0 if w is None else w for w in weights]
    assert [m.hessian_scale for m in cfg.models] == scales[:len(weights)]
    assert [m.model for m in cfg.models] == [f"child{i}" for i in range(len(weights))]
    if method == "gradient_matching":
        assert cfg.parameters["delta_0"] == delta
    # the same document as YAML text gives the same config
    assert load_merge_config(yaml.safe_load(yaml.safe_dump(doc))) == cfg
