"""``python -m bench`` from the repository root: the same command as ``sparsekern-bench``."""

import sys

from sparsekern.bench.cli import main

sys.exit(main())
