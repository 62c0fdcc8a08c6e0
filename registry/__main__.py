"""`python -m registry ...`: the operator command (see registry/cli.py)."""

import sys

from registry.cli import main

sys.exit(main())
