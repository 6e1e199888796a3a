"""blockcore-blkdebug: QEMU's blkdebug filter (fault injection, limits, breakpoints) for blockcore.

The driver module is :mod:`blockcore_blkdebug.driver` (entry point ``blkdebug`` in the group
``blockcore.drivers``); :mod:`blockcore_blkdebug.rules` parses rules and runs the state
machine.
"""
