"""``python -m bench.gpu_check.run_part NAME RESULT --workdir DIR --cap S [--quick]``: one part (see .part)."""

import sys

from .part import main

sys.exit(main())
