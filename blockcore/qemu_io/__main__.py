"""``python -m blockcore.qemu_io``: same as the ``blockcore-io`` console script."""

import sys

from . import _module_main

sys.exit(_module_main())
