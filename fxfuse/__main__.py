"""``python -m fxfuse``: the same as the ``fxfuse`` command."""

import sys

from fxfuse.cli import main

sys.exit(main())
