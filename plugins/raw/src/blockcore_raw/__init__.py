"""The ``file`` protocol and ``raw`` format drivers for blockcore (entry points ``file`` and
``raw`` in ``blockcore.drivers``).

Modules: ``file`` (POSIX regular files, on top of :mod:`blockcore.posix`) and ``raw`` (the
child's bytes, optionally a window onto them).
"""
