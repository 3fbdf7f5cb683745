"""The model card of a merge: the README.md (Hugging Face format, YAML front matter) that names the
method and its formula, every input with its α_t and N_t, and the command that reproduces the merge."""

from __future__ import annotations

import inspect
from typing import Any

import yaml

from gradmatch.methods import MergeMethod


def formula(method: MergeMethod) -> str:
    """The method's formula: the first paragraph of its function's docstring, on one line."""
    doc = inspect.getdoc(method.function) or method.summary
    return " ".join(doc.split("\n\n")[0].split()).rstrip(",;")


def _value(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def model_card(record: dict[str, Any], method: MergeMethod, command: str, config_name: str, config_text: str) -> str:
    """README.md text for a merge described by ``record`` (the content of merge.json).

    ``command`` and ``config_text`` (the file ``config_name``) reproduce the merge.
    """
    models = record["models"]
    hessians = record.get("base_hessian") is not None or any(m.get("hessian") for m in models)
    front = {
        "base_model": [record["base"], *(m["model"] for m in models)],
        "library_name": "transformers",
        "tags": ["merge", "gradmatch"],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [
        f"# Merge of {len(models)} model{'s' if len(models) != 1 else ''} fine-tuned from {record['base']}",
        "",
        f"Made with gradmatch {record['gradmatch_version']} by **{method.name}**: {method.summary.rstrip('.')}.",
        "",
        "## Method",
        "",
        "```text",
        formula(method),
        "```",
        "",
        "τ_t = θ_t − θ_0 is the task vector of child t, α_t its weight"
        + (", H_0 = N_0·F_0 + δ and H_t = N_t·F_t the Hessians (F the stored Fisher: the mean of squared "
           "gradients; N their scales, normally the training-set sizes; δ the prior precision `delta_0`)" if hessians else "")
        + ". Computed elementwise per tensor in "
        + f"{record.get('precision', 'float32')}; floating tensors written as "
        + (f"{record['out_dtype']}" if record.get("out_dtype") else "the parent stores them")
        + "; entries that are not floating point, `position_ids` and `masked_bias` are the parent's.",
        "",
    ]
    params = record.get("parameters") or {}
    if params:
        lines += ["Parameters: " + ", ".join(f"`{k}` = {_value(v)}" for k, v in params.items()) + ".", ""]
    lines += ["## Inputs", "", "| role | model | Hessian | α_t (weight) | N (Hessian scale) |", "|---|---|---|---|---|"]
    lines.append(f"| parent θ_0 | {record['base']} | {_value(record.get('base_hessian'))} | — "
                 f"| {_value(record.get('base_hessian_scale'))} |")
    for t, m in enumerate(models, start=1):
        lines.append(f"| child θ_{t} | {m['model']} | {_value(m.get('hessian'))} | {_value(m.get('weight'))} "
                     f"| {_value(m.get('hessian_scale'))} |")
    lines.append("")
    stats = record.get("statistics") or {}
    for key, value in stats.items():
        lines += [f"`{key}`: {value.get('total', 0):,} entries ({100 * value.get('fraction', 0):.4f} % of "
                  f"{record.get('merged_entries', 0):,} merged entries); per tensor in `merge.json`.", ""]
    fence = "~~~~" if "```" in config_text else "```"
    lines += [
        "## Reproduce",
        "",
        f"With gradmatch {record['gradmatch_version']}:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"with `{config_name}`:",
        "",
        fence + "yaml",
        config_text.rstrip("\n"),
        fence,
        "",
        "`merge.json` beside this card records the same in full.",
        "",
    ]
    return "\n".join(lines)
