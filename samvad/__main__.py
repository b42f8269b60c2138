"""``python -m samvad`` runs the ``samvad`` command."""

from __future__ import annotations

import sys

from samvad.cli import main

sys.exit(main())
