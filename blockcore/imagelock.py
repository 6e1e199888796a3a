"""Image locking interoperable with QEMU (raw_apply_lock_bytes, raw_check_lock_bytes,
raw_handle_perm_lock in file-posix.c): :class:`ImageLock` and :func:`ofd_locks_available`.

Open-file-description byte-range locks on bytes 100+bit (permissions held) and 200+bit
(permissions not shared), so blockcore and QEMU processes respect each other's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct

from .errors import PermissionConflictError
from .tiers import Tier, api
from .types import Perm

__all__ = ["LOCK_PERM_BASE", "LOCK_SHARED_BASE", "ImageLock", "ofd_locks_available"]

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_FLOCK = "hhqqi4x"  # struct flock (x86_64, aarch64): type, whence, start, len, pid
_PERM_BITS = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)
_ofd_available: bool | None = None


@api(Tier.COMMON)
def ofd_locks_available() -> bool:
    """Whether the kernel has open-file-description locks (probed once). Tier: common."""
    global _ofd_available
    if _ofd_available is None:
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
            _ofd_available = True
        except (OSError, AttributeError):
            _ofd_available = False
        finally:
            os.close(fd)
    return _ofd_available


def _lock_bytes(perm: Perm, unshared: Perm) -> set[int]:
    return {LOCK_PERM_BASE + i for i, b in enumerate(_PERM_BITS) if perm & b} | {
        LOCK_SHARED_BASE + i for i, b in enumerate(_PERM_BITS) if unshared & b
    }


class ImageLock:
    """Permission locks on one fd, interoperable with QEMU. Tier: GS.

    While the node holds permission bit ``i``, byte ``100+i`` carries a shared lock; while it
    does not share bit ``i``, byte ``200+i`` does. Whoever wants bit ``i`` tests byte
    ``200+i``; whoever refuses to share it tests ``100+i``. A permission update is
    :meth:`prepare`, then :meth:`commit` or :meth:`abort`. ``ofd=False`` uses POSIX locks
    (QEMU's ``locking=on`` without OFD locks; they are lost when any fd of the file closes).
    """

    def __init__(self, fd: int, filename: str, *, ofd: bool = True) -> None:
        self.fd = fd
        self.filename = filename
        self._getlk = fcntl.F_OFD_GETLK if ofd else fcntl.F_GETLK
        self._setlk = fcntl.F_OFD_SETLK if ofd else fcntl.F_SETLK
        self.perm, self.shared = Perm.NONE, Perm.ALL  # committed
        self.held: set[int] = set()  # lock bytes held now

    def _fcntl(self, cmd: int, kind: int, byte: int) -> int:
        raw = fcntl.fcntl(self.fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
        return int(struct.unpack(_FLOCK, raw)[0])

    def apply(self, perm: Perm, unshared: Perm, unlock: bool) -> None:
        """Lock the bytes for ``perm`` and ``unshared``; with ``unlock`` drop all others."""
        want = _lock_bytes(perm, unshared)
        for byte in sorted(want - self.held):
            try:
                self._fcntl(self._setlk, fcntl.F_RDLCK, byte)
            except OSError as exc:
                raise PermissionConflictError(f"failed to lock byte {byte}: {exc.strerror}",
                                              self.filename) from None  # fmt: skip
            self.held.add(byte)
        if unlock:
            for byte in sorted(self.held - want):
                with contextlib.suppress(OSError):  # QEMU ignores unlock failures (NFS)
                    self._fcntl(self._setlk, fcntl.F_UNLCK, byte)
                self.held.discard(byte)

    def check(self, perm: Perm, shared: Perm) -> None:
        """Raise :class:`PermissionConflictError` (with QEMU's message and a ``hint``) if
        another description's locks forbid taking ``perm`` or not sharing ``~shared``."""
        tests = [(LOCK_SHARED_BASE, perm, 'Failed to get "{}" lock'),
                 (LOCK_PERM_BASE, Perm.ALL & ~shared, 'Failed to get shared "{}" lock')]
        for base, bits, message in tests:
            for i, bit in enumerate(_PERM_BITS):
                if not bits & bit:
                    continue
                if self._fcntl(self._getlk, fcntl.F_WRLCK, base + i) != fcntl.F_UNLCK:
                    err = PermissionConflictError(message.format(bit.qemu_names[0]), self.filename)
                    err.hint = (  # type: ignore[attr-defined]
                        f"Is another process using the image [{self.filename}]?"
                    )
                    raise err

    def prepare(self, perm: Perm, shared: Perm) -> None:
        """Phase one: lock what both old and new permissions need, then test for conflicts."""
        shared &= Perm.ALL
        if (self.perm | perm) == self.perm and (self.shared & shared) == self.shared:
            return  # only giving things up cannot conflict
        try:
            self.apply(self.perm | perm, Perm.ALL & ~(self.shared & shared), False)
            self.check(perm, shared)
        except BaseException:
            self.abort()
            raise

    def commit(self, perm: Perm, shared: Perm) -> None:
        """Phase two: hold exactly the new locks. Never fails (as in QEMU)."""
        shared &= Perm.ALL
        with contextlib.suppress(OSError):
            self.apply(perm, Perm.ALL & ~shared, True)
        self.perm, self.shared = perm, shared

    def abort(self) -> None:
        """Return to the committed locks."""
        with contextlib.suppress(OSError):
            self.apply(self.perm, Perm.ALL & ~self.shared, True)

    def transfer(self, fd: int) -> ImageLock:
        """Move the locks to another description of the same file (reopen): lock there
        first, then unlock here, so other processes never see a gap. Returns the new lock."""
        other = ImageLock(fd, self.filename)
        other._getlk, other._setlk = self._getlk, self._setlk
        other.perm, other.shared = self.perm, self.shared
        for byte in sorted(self.held):
            other._fcntl(other._setlk, fcntl.F_RDLCK, byte)
            other.held.add(byte)
        for byte in sorted(self.held):
            with contextlib.suppress(OSError):
                self._fcntl(self._setlk, fcntl.F_UNLCK, byte)
        self.held.clear()
        return other

    def held_bytes(self) -> list[int]:
        """Lock bytes this description holds, sorted (tests, diagnostics)."""
        return sorted(self.held)
