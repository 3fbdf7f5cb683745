"""`gradmatch merge` from the command line: a merge YAML and an output folder, or the original scripts' flags
(`uncertainty_based_gradient_matching.py`, `task_arithmetic.py`) translated into the same merge config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradmatch.errors import UserError
from gradmatch.methods import get_method

_ORIGINAL_FLAGS = ("pretrained_model_name_or_path", "pretrained_hessian_path", "ft_model_name_or_paths",
                   "ft_hessian_paths", "scaling_factor_pt", "scaling_factors_ft", "delta_0", "scaling_factor",
                   "scaling_factors", "out_model_path", "method")


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


def config_from_original_flags(args) -> tuple[dict[str, Any], str]:
    """The merge config and output folder that the original scripts' flags mean.

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
    if uses_hessians:
        for entry, h, s in zip(config["models"], hessians, scales):
            entry.update(hessian=h, hessian_scale=s)
    if spec.uses_parent_hessian:
        if not args.pretrained_hessian_path:
            raise UserError(f"{method} needs --pretrained_hessian_path")
        config["base_hessian"] = args.pretrained_hessian_path
        config["base_hessian_scale"] = 1.0 if args.scaling_factor_pt is None else args.scaling_factor_pt
        if "delta_0" in spec.parameter_names:
            config["parameters"] = {"delta_0": 0.0 if args.delta_0 is None else args.delta_0}
    elif args.delta_0 is not None or args.pretrained_hessian_path or args.scaling_factor_pt is not None:
        raise UserError(f"--delta_0, --pretrained_hessian_path and --scaling_factor_pt apply to gradient_matching, "
                        f"not {method}")
    return config, args.out_model_path


def merge_from_args(args) -> Path:
    """Run `gradmatch merge` from parsed arguments: ``CONFIG.yaml OUT`` or the original flags."""
    flags = [f for f in _ORIGINAL_FLAGS if getattr(args, f, None) is not None]
    if args.config is not None:
        if flags:
            raise UserError(f"give either a merge YAML or the original flags, not both (got --{flags[0]})")
        if args.out is None:
            raise UserError("give the output folder: gradmatch merge CONFIG.yaml OUT")
        config, out = args.config, args.out
    else:
        config, out = config_from_original_flags(args)
    from gradmatch.merge import merge

    import gc

    gc.freeze()  # the command exits after merging: spare the interpreter's final pass over torch's objects (0.3 s)
    try:
        return merge(config, out, overwrite=args.overwrite, device=args.device, precision=args.precision,
                     out_dtype=args.out_dtype, max_shard_size=args.max_shard_size, block_rows=args.block_rows,
                     progress=not args.quiet, threads=args.threads, card=not args.no_card,
                     check_inputs=args.check_inputs, allow_config_mismatch=args.allow_config_mismatch,
                     kernel=args.kernel)
    except UserError as exc:
        if args.config is None and "denominator" in str(exc) and args.delta_0 is None:
            raise UserError(f"{exc}. With the original flags δ defaults to 0 and every N to 1, as in the original "
                            "script: pass --delta_0 1e-12 and the Hessian scales --scaling_factor_pt N0 "
                            "--scaling_factors_ft N1,N2,... (the training-set sizes)") from None
        raise


