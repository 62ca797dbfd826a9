"""``python -m bitnet`` = the ``bitnet`` command."""

import sys

from .cli import main

sys.exit(main())
