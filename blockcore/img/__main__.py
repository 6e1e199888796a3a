"""``python -m blockcore.img``: same as the ``blockcore-img`` console script."""

import sys

from . import _module_main

sys.exit(_module_main())
