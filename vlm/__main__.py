"""`python -m vlm` runs the command-line interface."""

import sys

from vlm.cli import main

sys.exit(main())
