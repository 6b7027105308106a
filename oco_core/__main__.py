"""``python -m oco_core`` runs the ``oco`` command."""

import sys

from ._cli import main

sys.exit(main())
