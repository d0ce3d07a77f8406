"""``python -m uniref.cli``: the ``uniref`` command."""

import sys

from uniref.cli import main

sys.exit(main())
