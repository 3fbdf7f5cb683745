"""gradmatch: merge models fine-tuned from one parent by uncertainty-based gradient matching, and its baselines.

(Each command is one module of this package, with an ``add(sub)`` function declaring its flags and a ``run(args)``
function that imports what it needs lazily — `gradmatch merge` must start fast — and calls the library; what the
commands share is :mod:`gradmatch.cli._base`. A :class:`~gradmatch.errors.UserError` anywhere becomes one line on
stderr and exit status 2.)
"""

from __future__ import annotations

import argparse
import os
import sys

from gradmatch.cli import (
    demo,
    evaluate,
    fisher,
    gram,
    merge,
    mismatch,
    report,
    run,
    train,
)
from gradmatch.cli._base import Parser
from gradmatch.errors import UserError

_EPILOG = """examples:
  gradmatch demo                                   a complete merge experiment on bundled data, offline
  gradmatch merge merge.yaml merged/               merge children described in a YAML file
  gradmatch fisher --model M --data sst2 --split "train[:200]" --out M-fisher
  gradmatch run experiments/sentiment.yaml --data-dir DATA --cores 2

`gradmatch COMMAND --help` describes each command; docs/ has the details."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gradmatch", description=__doc__.splitlines()[0], epilog=_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    from gradmatch import __version__

    parser.add_argument("--version", action="version", version=f"gradmatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in _COMMANDS:
        module.add(sub)
    return parser


#: The commands in the order `gradmatch --help` lists them.
_COMMANDS = [merge, train, evaluate, fisher, gram, run, report, demo, mismatch]


def main(argv: list[str] | None = None) -> int:
    from gradmatch import console

    try:
        args = build_parser().parse_args(argv)
        with console.configured(console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL):
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
