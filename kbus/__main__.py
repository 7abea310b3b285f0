"""``python -m kbus`` runs the ``kbus`` command."""

import sys

from .cli import main

sys.exit(main())
