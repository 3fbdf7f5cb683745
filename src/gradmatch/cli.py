"""The `gradmatch` command line: parse arguments, call the library, print. No logic lives here.

Each command has an ``_add_<command>`` function that declares its flags and a ``_run_<command>``
function that imports what it needs (lazily: `gradmatch merge` must start fast) and calls the
library. A :class:`~gradmatch.errors.UserError` anywhere becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from gradmatch.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UserError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------- merge


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned children of a common parent",
        description="Merge models fine-tuned from one parent. Either give a YAML config and an "
        "output folder (`gradmatch merge CONFIG.yaml OUT`) or the original script's flags.",
    )
    p.add_argument("config", nargs="?", help="merge YAML (method, base, models, parameters)")
    p.add_argument("out", nargs="?", help="output folder (Hugging Face model folder)")
    orig = p.add_argument_group("the original script's flags")
    orig.add_argument("--pretrained_model_name_or_path", "--pretrained-model", dest="pretrained_model_name_or_path")
    orig.add_argument("--pretrained_hessian_path", dest="pretrained_hessian_path")
    orig.add_argument("--ft_model_name_or_paths", dest="ft_model_name_or_paths")
    orig.add_argument("--ft_hessian_paths", dest="ft_hessian_paths")
    orig.add_argument("--scaling_factor_pt", dest="scaling_factor_pt", type=float)
    orig.add_argument("--scaling_factors_ft", dest="scaling_factors_ft")
    orig.add_argument("--delta_0", dest="delta_0", type=float)
    orig.add_argument("--scaling_factor", dest="scaling_factor", type=float)
    orig.add_argument("--scaling_factors", dest="scaling_factors", help="comma-separated α_t, one per child")
    orig.add_argument("--out_model_path", dest="out_model_path")
    orig.add_argument("--task_type", dest="task_type", default="SEQ_CLS")
    orig.add_argument("--method", default=None, help="merge method for the flag form (default: gradient_matching)")
    run = p.add_argument_group("execution")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    run.add_argument("--precision", choices=["float32", "float64"], default="float32", help="compute dtype")
    run.add_argument("--out-dtype", default=None, help="dtype to write (default: the parent's)")
    run.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB, 500MB")
    run.add_argument("--block-rows", type=int, default=None, help="rows per block for elementwise methods")
    run.add_argument("--clamp-denominator", type=float, default=None, metavar="EPS",
                     help="clamp the gradient-matching denominator to at least EPS instead of failing")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_merge)


def _run_merge(args) -> int:
    from gradmatch.merge import merge_from_cli

    out = merge_from_cli(args)
    print(f"merged model written to {out}")
    return 0


# --------------------------------------------------------------------------- fisher


def _add_fisher(sub) -> None:
    p = sub.add_parser(
        "fisher",
        help="estimate a model's diagonal Fisher (exact per-example squared gradients, batched)",
        description="Write OUT/hessian/: a model folder whose weights are the mean over examples of squared "
        "per-example gradients of log p(y|x), plus fisher.json. Under `torchrun --nproc_per_node K -m gradmatch "
        "fisher ...` the examples are shared out across processes with the same result. See docs/fisher.md.",
    )
    p.add_argument("--model", required=True, help="classifier: Hugging Face folder, hub id or alias")
    p.add_argument("--data", required=True, help="data set: preset, local JSON Lines/CSV file or folder, hub id")
    p.add_argument("--split", required=True, help="split, `datasets` syntax: train, train[:20%%], test[100:600]")
    p.add_argument("--estimator", choices=["sampled", "empirical"], default="sampled",
                   help="sampled: y drawn from the model (default, the original's); empirical: the true label")
    p.add_argument("--out", required=True, help="output folder (OUT/hessian/ is written)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (the result does not depend on it)")
    p.add_argument("--max-examples", type=int, default=None, help="use the first N examples of the split")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled labels (default 0)")
    p.add_argument("--data-dir", default=None, help="local data root <root>/<preset>/<split>.jsonl "
                   "(default: $GRADMATCH_DATA_DIR, else the hub)")
    p.add_argument("--config-name", default=None, help="the data set's configuration name (hub data sets)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_fisher)


def _run_fisher(args) -> int:
    from gradmatch.fisher import run_fisher

    out = run_fisher(args.model, args.data, args.split, out=args.out, estimator=args.estimator,
                     batch_size=args.batch_size, max_examples=args.max_examples, max_length=args.max_length,
                     seed=args.seed, data_dir=args.data_dir, overwrite=args.overwrite,
                     config_name=args.config_name, device=args.device, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Fisher written to {out}/hessian")
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradmatch", description=__doc__.splitlines()[0])
    from gradmatch import __version__

    parser.add_argument("--version", action="version", version=f"gradmatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [_add_merge]
_COMMANDS += [_add_fisher]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split())
        print(f"gradmatch: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradmatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
