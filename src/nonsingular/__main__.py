"""``python -m nonsingular``."""

import sys

from .cli import main

sys.exit(main())
