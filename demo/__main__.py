"""`python -m demo [--model DIR] [--host H] [--port P] [--device D] [--dtype T]`: the same as `vlm demo`."""

import sys

from vlm.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
