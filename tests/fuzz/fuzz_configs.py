"""Long fuzz run of the config reader(s): mutate the seed corpus (tests/fuzz/corpus/config/) and check that every
input is either read consistently or refused with a UserError naming the file (never a traceback).

    python tests/fuzz/fuzz_configs.py --iterations 100000 [--seed 0]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz_targets import parse_args, run_fuzz  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gradmatch-fuzz-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        counts = run_fuzz("config", args.iterations, args.seed, workdir)
    print(f"config: {args.iterations} iterations, seed {args.seed}, {time.time() - started:.0f} s, no failure: {counts}")


if __name__ == "__main__":
    main()
