"""``python -m fedsynsam`` is the ``fedsynsam`` command."""

import sys

from .cli import main

sys.exit(main())
