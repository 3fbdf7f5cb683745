"""Shared pieces of the pipeline tests: a tiny digits experiment and helpers to read a run folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

#: A reduced demo: few images, few epochs, 2 children, 2 α values, one thread per job.
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": "vit-digits",
    "parent": {
        "name": "original", "dataset": "digits-original", "train_split": "train[:240]", "test_split": "test[:120]",
        "extra_train": [{"dataset": "digits-rot90", "split": "train[:40]"},
                        {"dataset": "digits-inverted", "split": "train[:40]"}],
        "training": {"num_train_epochs": 20, "learning_rate": 3.0e-3},
    },
    "children": [
        {"name": "rot90", "dataset": "digits-rot90", "train_split": "train[40:200]", "test_split": "test[:120]"},
        {"name": "inverted", "dataset": "digits-inverted", "train_split": "train[40:200]", "test_split": "test[:120]",
         "train_size": 120},
    ],
    "training": {"per_device_train_batch_size": 32, "learning_rate": 1.0e-3, "num_train_epochs": 3,
                 "logging_strategy": "no"},
    "fisher": {"estimator": "sampled", "max_examples": 48, "batch_size": 16},
    "gram": {"max_examples": 48, "batch_size": 16},
    "merges": [
        {"method": "gradient_matching", "alphas": [0.5, 1.0], "parameters": {"delta_0": 1.0e-12}},
        {"method": "task_arithmetic", "alphas": [0.5, 1.0]},
        {"method": "regmean", "parameters": {"reduce_nondiagonal": 0.9}},
    ],
    "multitask": True,
    "evaluation": {"batch_size": 128},
    "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 15}},
}

#: Jobs of TINY: 7 prepare (3 test, 3 train, multitask), 4 train, 3 Fisher, 2 Gram, 4 evaluate, 3 merge, report.
TINY_JOB_COUNT = 24


def tiny(**changes) -> dict:
    exp = copy.deepcopy(TINY)
    exp.update(changes)
    return exp


def write_experiment(path: Path, exp: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(exp or TINY, sort_keys=False))
    return path


def finished_jobs(workdir: Path) -> dict[str, dict]:
    """hash → job.json of every finished job."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((workdir / "work").glob("*/job.json"))}


def report_rows(workdir: Path) -> list[dict]:
    return json.loads((workdir / "report" / "report.json").read_text())["rows"]
