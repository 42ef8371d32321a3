"""``python -m sparsekern.bench``: the same command as the ``sparsekern-bench`` console script."""

import sys

from sparsekern.bench.cli import main

sys.exit(main())
