"""The command Snakemake runs for one job: hand it to the warm job server if one is up, else run it here.

``python -m gradmatch.pipeline.jobrun WORKDIR/jobs/<hash>.json [--threads N] [--no-server]``
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradmatch.pipeline.jobrun", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the job's JSON spec (WORKDIR/jobs/<hash>.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-server", action="store_true", help="run here even when a job server is up")
    args = parser.parse_args(argv)
    if not args.no_server:
        from gradmatch.pipeline.jobserver import submit

        code = submit(args.spec, args.threads)
        if code is not None:
            return code
    from gradmatch.pipeline.jobs import execute

    return execute(args.spec, args.threads)


if __name__ == "__main__":
    sys.exit(main())
