"""qcow2 image format driver for blockcore (entry point ``qcow2`` in ``blockcore.drivers``).

Modules: ``format`` (on-disk layouts), ``cluster`` (offset helpers, L2 decoding), ``cache``
(metadata table cache), ``refcount`` (refcounts, allocation), ``check`` (consistency
check and repair, refcount structure rebuild), ``image`` (mapping,
reads, writes, fast paths), ``alloc`` (allocating writes), ``clusterops`` (zero writes,
discard, resize), ``compress`` (compressed clusters), ``driver`` (the hooks).
"""
