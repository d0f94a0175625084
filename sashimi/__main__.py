"""`python -m sashimi ...` (and `torchrun ... -m sashimi train ...`): the sashimi command line."""

import sys

from .cli import main

sys.exit(main())
