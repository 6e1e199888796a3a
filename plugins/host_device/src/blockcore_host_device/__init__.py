"""Linux device drivers for blockcore: ``host_device`` (block devices and SCSI generic nodes)
and ``host_cdrom`` (CD-ROM drives with removable media), on the shared POSIX engine of
:mod:`blockcore.posix`. Device ioctls go through the injectable layer of :mod:`.ioctl`."""
