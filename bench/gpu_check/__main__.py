"""``python -m bench.gpu_check OUT_DIR``: see the package's docstring."""

import sys

from .driver import main

sys.exit(main())
