"""Fisher jobs of several processes (`resources.fisher.processes`, `shard`; `fisher.out_dtype`,
`gradient_checkpointing`): the schema, what enters the hashes, the command a job runs, the threads Snakemake gives it,
the refusals, and a run whose Fisher job runs as 2 sharded processes under torchrun giving the one-process Hessian."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_lm, write_jsonl
from pipeline_helpers import TINY, tiny

from gradmatch.config.experiment import load_experiment
from gradmatch.errors import UserError
from gradmatch.pipeline.graph import build_jobs, job_spec

TEXTS = ["a fine film", "the worst thing I have ever seen, truly awful from start to end", "ok then", "bad bad bad",
         "meh, it was fine I guess, though the second half drags", "an utterly charming, clever and warm comedy",
         "dull and long", "I laughed, I cried, I left early", "two hours I will not get back"]


def _by_name(exp) -> dict:
    return {j.name: j for j in build_jobs(exp)}


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory) -> dict:
    """A tiny Llama (tied embeddings) and nine reviews: a causal-LM run whose Fisher can be sharded."""
    root = tmp_path_factory.mktemp("lm-processes")
    write_jsonl(root / "reviews.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    return {"root": root, "lm": make_tiny_lm(root / "llama", family="llama", tie=True), "data": root / "reviews.jsonl"}


def _lm_experiment(world: dict, resources: dict | None = None, **changes) -> dict:
    """A pretrained causal-LM parent (its Fisher on all nine reviews, labels sampled), one child, gradient matching."""
    exp = {"name": "lm", "model": str(world["lm"]),
           "parent": {"name": "general", "dataset": str(world["data"]), "finetune": False, "hessian_scale": 100},
           "children": [{"name": "negative", "dataset": str(world["data"]), "filter": {"label": 0}}],
           "training": {"per_device_train_batch_size": 4, "max_input_length": 32, "logging_strategy": "no"},
           "fisher": {"estimator": "sampled", "max_examples": None, "batch_size": 3, "max_length": 32},
           "merges": [{"method": "gradient_matching", "alphas": [-1.0]}], "multitask": False,
           "resources": {"default": {"threads": 1, "mem_mb": 1500, "runtime": 10}, **(resources or {})}}
    exp.update(changes)
    return exp


# --------------------------------------------------------------------------- schema and plan


def test_fisher_resources_default_to_one_plain_process():
    exp = load_experiment(tiny(resources={"default": {"threads": 3}, "fisher": {"processes": 4, "gpus": 4}}))
    fisher = exp.resources.for_kind("fisher")
    assert fisher.model_dump() == {"threads": 3, "mem_mb": 8000, "runtime": 120, "gpus": 4, "processes": 4,
                                   "shard": False}
    assert fisher.cpus == 12  # threads per process × processes
    assert exp.resources.for_kind("train").model_dump() == {"threads": 3, "mem_mb": 8000, "runtime": 240, "gpus": 0,
                                                            "processes": 1, "shard": False}
    plain = load_experiment(tiny())
    assert (plain.resources.for_kind("fisher").processes, plain.resources.for_kind("fisher").shard) == (1, False)
    assert (plain.fisher.out_dtype, plain.fisher.gradient_checkpointing) == (None, False)


def test_how_a_fisher_job_runs_enters_no_hash():
    """processes, shard and gradient_checkpointing change how a Fisher job runs, not the Fisher: every job keeps its
    hash (earlier run folders are reused), only the Fisher jobs carry a launch, and their spec hands it over."""
    base = _by_name(TINY)
    launched = _by_name(tiny(resources={**TINY["resources"], "fisher": {"processes": 3}},
                             fisher={**TINY["fisher"], "gradient_checkpointing": True}))
    assert {n: j.hash for n, j in launched.items()} == {n: j.hash for n, j in base.items()}
    fishers = sorted(n for n, j in launched.items() if j.kind == "fisher")
    assert fishers == ["fisher/child-inverted", "fisher/child-rot90", "fisher/parent"]
    for name, job in launched.items():
        assert job.launch == ({"processes": 3, "gradient_checkpointing": True} if name in fishers else {}), name
        assert job.params == base[name].params
    spec = job_spec(launched["fisher/parent"], "/run")
    assert spec["launch"] == {"processes": 3, "gradient_checkpointing": True}
    assert "launch" not in job_spec(base["fisher/parent"], "/run")  # a plain job's spec is what it was
    assert launched["fisher/parent"].resources.processes == 3 and base["fisher/parent"].resources.processes == 1


def test_out_dtype_enters_the_fisher_hash_and_what_reads_it(lm_world):
    """The stored dtype changes the files: the Fisher jobs and everything downstream of them rerun, nothing else."""
    base = _by_name(TINY)
    bf16 = _by_name(tiny(fisher={**TINY["fisher"], "out_dtype": "bfloat16"}))
    changed = sorted(n for n, j in bf16.items() if j.hash != base[n].hash)
    assert changed == ["fisher/child-inverted", "fisher/child-rot90", "fisher/parent", "merges/gradient_matching",
                       "report"]
    assert bf16["fisher/parent"].params == {**base["fisher/parent"].params, "out_dtype": "bfloat16"}
    generated = _by_name(_lm_experiment(lm_world, fisher={"data": "generated", "examples": 4, "out_dtype": "float16"},
                                        merges=[{"method": "gradient_matching", "alphas": [-1.0]},
                                                {"method": "gradient_matching", "name": "gm-free", "alphas": [-1.0],
                                                 "base_hessian": "generated"}]))
    assert generated["fisher/parent"].params == {"data": "generated", "examples": 4, "batch_size": 16,
                                                 "max_length": 128, "out_dtype": "float16", "seed": 0}
    split = _by_name(_lm_experiment(lm_world, fisher={"examples": 4, "out_dtype": "float64"},
                                    merges=[{"method": "gradient_matching", "name": "gm-free", "alphas": [-1.0],
                                             "base_hessian": "generated"}]))
    assert split["fisher/parent-generated"].params["out_dtype"] == "float64"  # base_hessian: generated's job too


def test_the_command_of_a_fisher_job_of_several_processes():
    """Written out by hand: `gradmatch fisher` under torchrun on this node with the job's settings."""
    from gradmatch.pipeline.jobs import fisher_command

    params = {"estimator": "empirical", "max_examples": 48, "batch_size": 16, "max_length": 64, "seed": 7,
              "kind": "causal-lm", "out_dtype": "bfloat16",
              "launch": {"processes": 4, "shard": True, "gradient_checkpointing": True}}
    inputs = {"model": "/run/work/train-1", "data": "/run/work/prepare-2"}
    assert fisher_command(params, inputs, Path("/run/work/tmp")) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "4",
        "-m", "gradmatch", "fisher", "--model", "/run/work/train-1/model", "--out", "/run/work/tmp/fisher",
        "--seed", "7", "--batch-size", "16", "--max-length", "64", "--data", "/run/work/prepare-2/data",
        "--split", "train", "--estimator", "empirical", "--max-examples", "48", "--kind", "causal-lm",
        "--out-dtype", "bfloat16", "--shard", "--gradient-checkpointing"]
    generated = {"data": "generated", "examples": 32, "batch_size": 8, "max_length": 24, "seed": 0,
                 "launch": {"processes": 2}}
    assert fisher_command(generated, {"model": "/run/work/pretrained-3"}, Path("/o")) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "-m", "gradmatch", "fisher", "--model", "/run/work/pretrained-3/model", "--out", "/o/fisher", "--seed", "0",
        "--batch-size", "8", "--max-length", "24", "--data", "generated", "--examples", "32"]


def test_snakemake_gives_a_fisher_job_threads_times_processes(tmp_path):
    """The rule's threads (Snakemake's cores locally; SLURM's --cpus-per-task of the job's one task) are the threads
    of each process times the processes; every other job keeps its threads."""
    from gradmatch.pipeline.runner import SNAKEFILE, write_plan

    jobs = build_jobs(tiny(resources={"default": {"threads": 3, "mem_mb": 1000, "runtime": 15},
                                      "fisher": {"processes": 2}}))
    plan = write_plan(jobs, tmp_path)
    planned = {j["kind"]: j["resources"] for j in json.loads(plan.read_text())["jobs"]}
    assert (planned["fisher"]["processes"], planned["fisher"]["cpus"], planned["train"]["cpus"]) == (2, 6, 3)
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
                          "--config", f"plan={plan}", "--dry-run", "--cores", "16", "--printshellcmds", "--nocolor"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    threads = dict(re.findall(r"rule (\w+):.*?\n\s+threads: (\d+)", out.stdout + out.stderr, flags=re.DOTALL))
    fisher_rules = {j.rule for j in jobs if j.kind == "fisher"}
    assert {rule: threads[rule] for rule in fisher_rules} == {rule: "6" for rule in fisher_rules}
    assert threads["models_parent"] == "3"
    assert re.search(r"fisher-\w+\.json' --threads 6 >", out.stdout + out.stderr)


@pytest.mark.parametrize("change, words", [
    ({"resources": {"fisher": {"processes": 0}}}, "resources.fisher.processes: Input should be greater than or equal"),
    ({"resources": {"train": {"processes": 2}}}, "resources.train: processes applies to fisher jobs only"),
    ({"resources": {"default": {"shard": True}}}, "resources.default: shard applies to fisher jobs only"),
    ({"resources": {"fisher": {"shard": True}}}, ("fisher.shard: true shares each Fisher job's model out over its "
                                                  "processes: set fisher.processes to 2 or more")),
    ({"resources": {"fisher": {"processes": 2, "gpus": 1}}}, "fisher.gpus: 1 with fisher.processes: 2: each process"),
    ({"resources": {"default": {"gpus": 4}, "fisher": {"processes": 2}}}, "fisher.gpus: 4 with fisher.processes: 2"),
    ({"fisher": {"out_dtype": "int8"}}, "fisher.out_dtype: Input should be 'float32'"),
])
def test_bad_launch_settings_are_refused_when_read(change, words):
    with pytest.raises(UserError, match=re.escape(words)):
        load_experiment(tiny(**change))


def test_a_data_free_fisher_is_refused_sharded(lm_world):
    sharded = {"fisher": {"processes": 2, "shard": True}}
    with pytest.raises(UserError, match="resources.fisher.shard: true with fisher.data: generated: a data-free Fisher"):
        load_experiment(_lm_experiment(lm_world, sharded, fisher={"data": "generated", "examples": 4}))
    with pytest.raises(UserError, match="with merges: gm-free: base_hessian: generated, whose H_0 is a data-free"):
        load_experiment(_lm_experiment(lm_world, sharded, merges=[
            {"method": "gradient_matching", "name": "gm-free", "alphas": [-1.0], "base_hessian": "generated"}]))
    # processes alone share the sequences out: accepted, and the generated jobs run as 2 processes
    jobs = _by_name(_lm_experiment(lm_world, {"fisher": {"processes": 2}}, fisher={"data": "generated", "examples": 4}))
    assert jobs["fisher/parent"].launch == {"processes": 2}
    # task arithmetic reads no H_0: base_hessian: generated there adds no job, so shard stays possible
    load_experiment(_lm_experiment(lm_world, sharded, merges=[{"method": "task_arithmetic", "alphas": [-1.0],
                                                               "base_hessian": "generated"}]))


def test_an_architecture_that_cannot_be_sharded_is_refused_before_the_run(lm_world, tmp_path, capsys):
    """The demo's ViT has a module without a closed-form rule (its embeddings: cls token, positions): refused at the
    dry run, naming the job and the module; the tiny Llama passes the same check."""
    from pipeline_helpers import write_experiment

    from gradmatch.cli import main

    path = write_experiment(tmp_path / "vit.yaml", tiny(resources={"fisher": {"processes": 2, "shard": True}}))
    assert main(["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: fisher/parent: resources.fisher.shard: module "
                                                   "vit.embeddings (ViTEmbeddings) of model vit-digits"), lines
    assert not (tmp_path / "run").exists()
    from gradmatch.pipeline.preflight import check_inputs

    jobs = build_jobs(_lm_experiment(lm_world, {"fisher": {"processes": 2, "shard": True}},
                                     fisher={"max_examples": None, "gradient_checkpointing": True}))
    check_inputs(jobs, lambda job: False)


# --------------------------------------------------------------------------- the jobs themselves


def _hessian(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "hessian" / "model.safetensors"))


def _worst_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30))
               for k in a)


@pytest.mark.slow
def test_a_fisher_job_of_two_sharded_processes_gives_the_one_process_hessian(lm_world, tmp_path):
    """The parent's Fisher job of the same experiment run as one process and as 2 sharded processes under torchrun
    (75 s for both on the 2-core machine): the same Hessian within 1e-5, both equal to the original's method (one
    example at a time, its whole gradient squared) in float64 on the prepared rows; one hash, so one folder name."""
    import datasets
    from transformers import AutoModelForCausalLM

    from gradmatch.fisher import estimate_fisher_reference
    from gradmatch.kinds import kind_of_config
    from gradmatch.models import load_processor
    from gradmatch.pipeline.runner import run_jobs
    from gradmatch.statistics import batches

    runs = {}
    for tag, resources in (("one", None), ("two", {"fisher": {"processes": 2, "shard": True}})):
        job = _by_name(_lm_experiment(lm_world, resources))["fisher/parent"]
        result = run_jobs([job], tmp_path / tag, cores=2, output="quiet", echo=lambda *_: None)
        assert result.returncode == 0, [p.read_text()[-3000:] for p in (tmp_path / tag / "logs").glob("*.log")]
        runs[tag] = job
    assert runs["one"].hash == runs["two"].hash
    one, two = (tmp_path / tag / "fisher" / "parent" for tag in ("one", "two"))
    assert _worst_relative(_hessian(one), _hessian(two)) <= 1e-5
    records = [json.loads((f / "hessian" / "fisher.json").read_text()) for f in (one, two)]
    assert [(r["num_processes"], r["sharded"], r["num_examples"]) for r in records] == [(1, False, 9), (2, True, 9)]
    finished = json.loads((tmp_path / "two" / "work" / runs["two"].hash / "job.json").read_text())
    assert finished["launch"] == {"processes": 2, "shard": True} and "launch" not in finished["params"]
    log = next((tmp_path / "two" / "logs").glob("fisher_parent.*.log")).read_text()
    assert "with 2 thread(s)" in log and "2 processes of 1 thread(s): OMP_NUM_THREADS=1 " in log
    assert "-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m gradmatch fisher" in log

    model_dir = tmp_path / "one" / "models" / "parent"
    model = AutoModelForCausalLM.from_pretrained(model_dir).double()
    kind = kind_of_config(model.config)
    rows = datasets.load_from_disk(str(tmp_path / "one" / "data" / "general-train"))
    encoded = kind.encode(rows, load_processor(str(model_dir), kind=kind), 32)
    collate = kind.collator(load_processor(str(model_dir), kind=kind))
    expected = estimate_fisher_reference(model, batches(encoded, collate, list(range(len(encoded))), 4), kind=kind,
                                         estimator="sampled", seed=0)
    names = {n for n, _ in model.named_parameters()}
    assert _worst_relative({k: expected[k] for k in names}, _hessian(two)) <= 1e-5


@pytest.mark.slow
def test_a_bad_input_in_the_processes_is_the_jobs_one_line(lm_world, tmp_path):
    """What every torchrun process refuses (`gradmatch: error: …`) is the job's own one-line error, and the job's
    output folder gets nothing."""
    from gradmatch.pipeline.jobs import fisher

    model = tmp_path / "pretrained"
    (model / "model").parent.mkdir(parents=True)
    (model / "model").symlink_to(lm_world["lm"], target_is_directory=True)
    params = {"estimator": "sampled", "max_examples": None, "batch_size": 3, "max_length": 32, "seed": 0,
              "launch": {"processes": 2, "shard": True}}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"does not exist") as caught:
        fisher(params, {"model": str(model), "data": str(tmp_path / "no-such-prepare")}, out)
    assert "\n" not in str(caught.value) and "no-such-prepare" in str(caught.value)
    assert list(out.iterdir()) == []
