"""`python -m qwentune` and `accelerate launch -m qwentune train RECIPE`."""

import sys

from .cli import main

sys.exit(main())
