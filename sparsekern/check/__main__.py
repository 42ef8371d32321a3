"""``python -m sparsekern.check``: see the package docstring."""

import sys

from sparsekern.check.cli import main

sys.exit(main())
