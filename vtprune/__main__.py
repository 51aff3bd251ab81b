"""`python -m vtprune`: the same command line as `vtprune`."""

import sys

from .cli import main

sys.exit(main())
