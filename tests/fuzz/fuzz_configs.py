"""Long fuzz run of the config reader(s): mutate the seed corpus (tests/fuzz/corpus/config/) and check that every
input is either read consistently or refused with a UserError naming the file (never a traceback).

    python tests/fuzz/fuzz_configs.py --iterations 100000 [--seed 0]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz_targets import main  # noqa: E402

if __name__ == "__main__":
    main("config", __doc__)
