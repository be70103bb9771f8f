"""``python -m isolator``: see :mod:`isolator.cli`."""

from __future__ import annotations

import sys

from isolator.cli import main

sys.exit(main())
