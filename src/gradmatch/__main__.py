"""`python -m gradmatch` (also what `torchrun -m gradmatch` runs)."""

import sys

from gradmatch.cli import main

sys.exit(main())
