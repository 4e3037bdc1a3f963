"""``python -m pallas_kernels._native [--force]``: builds the native CPU kernels."""

import sys

from pallas_kernels._native.build import main

sys.exit(main())
