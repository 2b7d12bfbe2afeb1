"""``python -m fastcache`` is the ``fastcache`` command."""

import sys

from fastcache.cli import main

sys.exit(main())
