"""`gradmatch merge` from the command line: a merge YAML and an output folder, or the original scripts' flags
(`uncertainty_based_gradient_matching.py`, `task_arithmetic.py`) translated into the same merge config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gradmatch.cli._base import Removed, command
from gradmatch.config.options import add_flags, options_from_args
from gradmatch.errors import UserError
from gradmatch.methods import get_method, method_names


def add(sub) -> None:
    p = command(
        sub, "merge",
        help="merge fine-tuned children of a common parent",
        description="Merge models fine-tuned from one parent into one Hugging Face model folder. Give a merge YAML "
        "(gradmatch's own, or a mergekit YAML for the methods both have) and an output folder, or the original "
        "scripts' flags. Methods, parameters and guarantees: docs/merge.md.",
        examples=["gradmatch merge merge.yaml merged/",
                  "gradmatch merge mergekit.yaml merged/ --out-dtype bfloat16",
                  "gradmatch merge --pretrained-model-name-or-path parent --pretrained-hessian-path parent-fisher \\",
                  "    --ft-model-name-or-paths a,b --ft-hessian-paths a-fisher,b-fisher --scaling-factor-pt 2000 \\",
                  "    --scaling-factors-ft 1000,1000 --delta-0 1e-12 --out-model-path merged/"],
    )
    p.add_argument("config", nargs="?", help="merge YAML (method, base, models, parameters)")
    p.add_argument("out", nargs="?", help="output folder (Hugging Face model folder)")
    orig = p.add_argument_group(
        "the original scripts' flags",
        "uncertainty_based_gradient_matching.py and task_arithmetic.py, same meaning and defaults (their underscore "
        "spellings are accepted too, e.g. --pretrained_model_name_or_path)")

    def flag(name: str, *more: str, **kwargs):
        orig.add_argument(f"--{name.replace('_', '-')}", f"--{name}", *more, dest=name, **kwargs)

    flag("pretrained_model_name_or_path", "--pretrained-model", metavar="PATH",
         help="the parent θ_0 (folder, hub id, or an alias: minilm, smollm2)")
    flag("pretrained_hessian_path", metavar="PATH", help="the parent's Hessian F_0: a fisher output folder or its hessian/")
    flag("ft_model_name_or_paths", metavar="A,B,...", help="comma-separated fine-tuned children θ_t")
    flag("ft_hessian_paths", metavar="HA,HB,...", help="comma-separated Hessians F_t of the children, in the same order")
    flag("scaling_factor_pt", type=float, metavar="N0", help="N_0, the scale of the parent's Hessian (the original's "
         "default 1.0; give the parent's training-set size)")
    flag("scaling_factors_ft", metavar="N1,N2,...", help="N_t, the scales of the children's Hessians (default 1.0 "
         "each; give their training-set sizes)")
    flag("delta_0", type=float, metavar="DELTA", help="prior precision δ added to N_0·F_0 (the original's default 0.0; "
         "1e-12 works well)")
    flag("scaling_factor", type=float, metavar="ALPHA", help="α, one weight for every task vector (default 1.0)")
    flag("scaling_factors", metavar="A1,A2,...", help="comma-separated α_t, one per child (instead of --scaling-factor)")
    flag("out_model_path", metavar="OUT", help="the output folder")
    flag("task_type", default="SEQ_CLS", help="accepted for compatibility; the merge reads weight files whatever the head")
    orig.add_argument("--method", default=None, choices=method_names(),
                      help="the method (default: gradient_matching when Hessians are given, else task_arithmetic)")
    exe = p.add_argument_group("execution", "how the merge runs and is written (gradmatch.config.options.MergeOptions; "
                               "merge.json records them all, its command every one that is not the default)")
    add_flags(exe)
    exe.add_argument("--clamp-denominator", action=Removed, help=argparse.SUPPRESS,
                     message="--clamp-denominator was replaced by the removal guard: set parameters: "
                     "{max_update_ratio: R} in the merge YAML (see docs/merge.md, Removal)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = merge_from_args(args)
    print(f"merged model written to {out}")
    return 0


_ORIGINAL_FLAGS = ("pretrained_model_name_or_path", "pretrained_hessian_path", "ft_model_name_or_paths",
                   "ft_hessian_paths", "scaling_factor_pt", "scaling_factors_ft", "delta_0", "scaling_factor",
                   "scaling_factors", "out_model_path", "method")


#: merge.json's scale_sources for a Hessian scale the original flags did not give (1.0, as the original script).
_DEFAULT_SOURCE = "default of the original flags"


def _split(text: str | None, flag: str | None = None) -> list[str]:
    parts = [part.strip() for part in text.split(",")] if text else []
    if flag and any(not part for part in parts):
        raise UserError(f"--{flag} {text!r} has an empty entry (a stray comma?)")
    return parts


def _floats(text: str | None, flag: str) -> list[float]:
    values = []
    for part in _split(text, flag):
        try:
            values.append(float(part))
        except ValueError:
            raise UserError(f"--{flag}: {part!r} is not a number") from None
    return values


def config_from_original_flags(args) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The merge config and output folder that the original scripts' flags mean, and where each Hessian scale
    written into the config came from (role → the flag, or the flags' default; for merge.json's scale_sources).

    Same meaning and defaults as `uncertainty_based_gradient_matching.py` (``--scaling_factor`` 1.0,
    ``--scaling_factor_pt`` 1.0, ``--delta_0`` 0.0) and `task_arithmetic.py`. The method is
    gradient_matching when Hessians are given, else task_arithmetic, unless ``--method`` says otherwise.
    ``--scaling_factors_ft`` defaults to 1.0 per child (the original required it).
    """
    if not args.pretrained_model_name_or_path:
        raise UserError("give a merge YAML and an output folder (gradmatch merge CONFIG.yaml OUT) "
                        "or the original flags, starting with --pretrained_model_name_or_path")
    if not args.out_model_path:
        raise UserError("--out_model_path is required with the original flags")
    models = _split(args.ft_model_name_or_paths, "ft_model_name_or_paths")
    if not models:
        raise UserError("--ft_model_name_or_paths is required: the comma-separated fine-tuned models")
    hessians = _split(args.ft_hessian_paths, "ft_hessian_paths")
    method = args.method or ("gradient_matching" if hessians or args.pretrained_hessian_path else "task_arithmetic")
    if args.scaling_factor is not None and args.scaling_factors:
        raise UserError("give either --scaling_factor (one α for all) or --scaling_factors (one per model), not both")
    alphas = _floats(args.scaling_factors, "scaling_factors") or [1.0 if args.scaling_factor is None else args.scaling_factor] * len(models)
    if len(alphas) != len(models):
        raise UserError(f"--scaling_factors has {len(alphas)} values but --ft_model_name_or_paths has {len(models)} models")
    try:
        spec = get_method(method)
    except ValueError as exc:
        raise UserError(f"--method: {exc}") from None
    uses_hessians = spec.uses_child_hessians
    if uses_hessians and len(hessians) != len(models):
        raise UserError(f"--ft_hessian_paths has {len(hessians)} paths but --ft_model_name_or_paths has {len(models)} models")
    scales = _floats(args.scaling_factors_ft, "scaling_factors_ft") or [1.0] * len(models)
    if len(scales) != len(models):
        raise UserError(f"--scaling_factors_ft has {len(scales)} values but --ft_model_name_or_paths has {len(models)} models")
    if any(s < 0 for s in scales) or (args.scaling_factor_pt is not None and args.scaling_factor_pt < 0):
        raise UserError("Hessian scaling factors must not be negative")
    config: dict[str, Any] = {
        "method": method,
        "base": args.pretrained_model_name_or_path,
        "models": [{"model": m, "weight": a} for m, a in zip(models, alphas)],
    }
    sources: dict[str, str] = {}
    if uses_hessians:
        for i, (entry, h, s) in enumerate(zip(config["models"], hessians, scales)):
            entry.update(hessian=h, hessian_scale=s)
            sources[f"models[{i}]"] = ("--scaling_factors_ft" if args.scaling_factors_ft
                                       else f"{_DEFAULT_SOURCE} (--scaling_factors_ft 1.0 each)")
    if spec.uses_parent_hessian:
        if not args.pretrained_hessian_path:
            raise UserError(f"{method} needs --pretrained_hessian_path")
        config["base_hessian"] = args.pretrained_hessian_path
        config["base_hessian_scale"] = 1.0 if args.scaling_factor_pt is None else args.scaling_factor_pt
        sources["base"] = (f"{_DEFAULT_SOURCE} (--scaling_factor_pt 1.0)" if args.scaling_factor_pt is None
                           else "--scaling_factor_pt")
        if "delta_0" in spec.parameter_names:
            config["parameters"] = {"delta_0": 0.0 if args.delta_0 is None else args.delta_0}
    elif args.delta_0 is not None or args.pretrained_hessian_path or args.scaling_factor_pt is not None:
        raise UserError(f"--delta_0, --pretrained_hessian_path and --scaling_factor_pt apply to gradient_matching, "
                        f"not {method}")
    return config, args.out_model_path, sources


def merge_from_args(args) -> Path:
    """Run `gradmatch merge` from parsed arguments: ``CONFIG.yaml OUT`` or the original flags."""
    flags = [f for f in _ORIGINAL_FLAGS if getattr(args, f, None) is not None]
    if args.config is not None:
        if flags:
            raise UserError(f"give either a merge YAML or the original flags, not both (got --{flags[0]})")
        if args.out is None:
            raise UserError("give the output folder: gradmatch merge CONFIG.yaml OUT")
        config, out, sources = args.config, args.out, {}
    else:
        config, out, sources = config_from_original_flags(args)
    options = options_from_args(args)
    import gc

    from gradmatch.merge import merge

    gc.freeze()  # the command exits after merging: spare the interpreter's final pass over torch's objects (0.3 s)
    try:
        return merge(config, out, options, progress=not args.quiet, scale_sources=sources)
    except UserError as exc:
        if args.config is None and "denominator" in str(exc) and args.delta_0 is None:
            raise UserError(f"{exc}. With the original flags δ defaults to 0 and every N to 1, as in the original "
                            "script: pass --delta_0 1e-12 and the Hessian scales --scaling_factor_pt N0 "
                            "--scaling_factors_ft N1,N2,... (the training-set sizes)") from None
        raise


