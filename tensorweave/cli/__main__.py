"""``python -m tensorweave.cli``: the ``tensorweave`` command without the console script (tests, launch's ranks)."""

import sys

from . import main

sys.exit(main())
