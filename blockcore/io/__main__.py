"""``python -m blockcore.io``: the ``blockcore-io`` tool, as ``python -m blockcore.qemu_io``.

(:mod:`blockcore.io` itself is the request path; the tool lives in :mod:`blockcore.qemu_io`.)
"""

import sys

from blockcore.qemu_io import _module_main

sys.exit(_module_main())
