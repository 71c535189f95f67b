"""`python -m projector_training` (also what `accelerate launch -m projector_training` runs)."""

import sys

from projector_training.train import main

sys.exit(main())
