"""host_device on a SCSI generic node: this machine has no /dev/sg*, so every test here runs
on :class:`blockcore_host_device.fake.FakeSg` (answers as Linux; see test_fake.py)."""

from __future__ import annotations

import ctypes

import pytest
from blockcore import BlockBackend, OpenFlags, hookimpl, register_driver, unregister_driver
from blockcore.drivers import bdrv_find_format, bdrv_find_protocol
from blockcore.errors import BlockError, NotSupportedError, PermissionConflictError
from blockcore.graph import bdrv_open, bdrv_open_child, bdrv_unref
from blockcore.info import bdrv_is_sg
from blockcore.io import bdrv_flush
from blockcore.special import bdrv_co_ioctl
from blockcore.types import ChildRole, DriverDescriptor

from blockcore_host_device import ioctl as io_
from blockcore_host_device.fake import FakeSg
from blockcore_host_device.ioctl import SgIoHdr

DISC = bytes(range(256)) * 8 * 16  # 32 KiB, 16 sectors of 2 KiB


@pytest.fixture
def sg(fake) -> FakeSg:
    return fake.add("/dev/sg0", FakeSg(DISC))


def _sg_io(co, bs, cdb: bytes, length: int) -> tuple[SgIoHdr, bytes, bytes]:
    data, sense = ctypes.create_string_buffer(max(length, 1)), ctypes.create_string_buffer(32)
    hdr = SgIoHdr.request(cdb, data if length else None, io_.SG_DXFER_FROM_DEV, sense)
    assert co(bdrv_co_ioctl(bs, io_.SG_IO, hdr)) == 0
    return hdr, data.raw[:length], sense.raw[: hdr.sb_len_wr]


def test_probing(fake, sg) -> None:
    assert bdrv_find_format("host_device").bdrv_probe_device("/dev/sg0") == 100
    assert bdrv_find_format("host_cdrom").bdrv_probe_device("/dev/sg0") == 0
    assert bdrv_find_protocol("/dev/sg0").name == "host_device"


@pytest.mark.parametrize("flags", [OpenFlags.NONE, OpenFlags.RDWR], ids=["ro", "rw"])
def test_an_sg_node_is_sg(fake, sg, flags) -> None:
    bs = bdrv_open("/dev/sg0", {"driver": "host_device"}, flags)
    try:
        assert bdrv_is_sg(bs) and bs.opaque.sg
        assert bs.total_bytes == 0  # QEMU reports no length for sg
        assert bs.bl.request_alignment == 1
        assert bs.bl.max_transfer == 512 * 512  # BLKSECTGET: an int in bytes on sg
        bdrv_flush(bs)  # a no-op: nothing is written through read/write
    finally:
        bdrv_unref(bs)
    assert sg.use_count == 0


def test_no_alignment_probing_under_o_direct(fake, sg) -> None:
    bs = bdrv_open("/dev/sg0", {"driver": "host_device", "cache": {"direct": True}},
                   OpenFlags.RDWR)  # fmt: skip
    try:
        assert bs.bl.request_alignment == 1 and bs.bl.min_mem_alignment == 1
    finally:
        bdrv_unref(bs)


def test_requests_go_as_sg_io(fake, sg, co) -> None:
    with BlockBackend.open("/dev/sg0", {"driver": "host_device"}, OpenFlags.RDWR) as blk:
        bs = blk.bs
        hdr, data, _ = _sg_io(co, bs, bytes([0x12, 0, 0, 0, 36, 0]), 36)
        assert hdr.status == 0 and data[0] == 5 and data[16:27] == b"FAKE CD-ROM"
        hdr, data, _ = _sg_io(co, bs, bytes([0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0]), 2048)
        assert hdr.status == 0 and data == DISC[4096:6144]
        hdr, _, sense = _sg_io(co, bs, bytes([0x28, 0, 0, 0, 1, 0, 0, 0, 1, 0]), 2048)
        assert hdr.status == 2 and hdr.info & io_.SG_INFO_CHECK  # LBA out of range
        assert (sense[2], sense[12]) == (5, 0x21)
        with pytest.raises(NotSupportedError, match="ioctl 0x5326 not supported"):
            co(bdrv_co_ioctl(bs, io_.CDROM_DRIVE_STATUS, io_.CDSL_CURRENT))
        buf = memoryview(bytearray(512))
        with pytest.raises(NotSupportedError, match="data moves only by SG_IO"):
            co(bs.drv.bdrv_co_preadv(bs, 0, 512, buf, 0))


def test_bad_sg_io_header_keeps_the_kernels_errno(fake, sg, co) -> None:
    with BlockBackend.open("/dev/sg0", {"driver": "host_device"}, OpenFlags.RDWR) as blk:
        sense = ctypes.create_string_buffer(32)
        hdr = SgIoHdr.request(bytes(6), None, io_.SG_DXFER_NONE, sense)
        hdr.interface_id = ord("Z")
        with pytest.raises(OSError) as exc:
            co(bdrv_co_ioctl(blk.bs, io_.SG_IO, hdr))
        assert exc.value.errno == 38  # ENOSYS: sg_new_write's answer to a wrong interface


def test_host_cdrom_sends_sg_nodes_to_host_device(fake, sg) -> None:
    with pytest.raises(BlockError, match="not a character device: use driver 'host_device'"):
        BlockBackend.open("/dev/sg0", {"driver": "host_cdrom"})


def test_sg_io_through_a_scsi_block_device(fake, co) -> None:
    """A SCSI block device (here the fake sr) is not "sg" but takes SG_IO requests."""
    from blockcore_host_device.fake import FakeCdrom

    fake.add("/dev/sr0", FakeCdrom(DISC))
    with BlockBackend.open("/dev/sr0", {"driver": "host_device"}) as blk:
        assert not bdrv_is_sg(blk.bs) and blk.getlength() == len(DISC)
        hdr, data, _ = _sg_io(co, blk.bs, bytes([0x25] + [0] * 9), 8)
        assert hdr.status == 0 and int.from_bytes(data[4:], "big") == 2048


class _TinyFormat:
    """An in-process image format that opens a 'file' child (stands in for qcow2)."""

    name = "tinyfmt"

    @hookimpl
    def bdrv_describe(self) -> DriverDescriptor:
        return DriverDescriptor(format_name=self.name, is_format=True, child_names=("file",))

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        bdrv_open_child(bs, options, "file", ChildRole.IMAGE)


def test_no_image_format_on_an_sg_node(fake, sg) -> None:
    drv = _TinyFormat()
    register_driver(drv, drv.name)
    try:
        with pytest.raises(PermissionConflictError, match="SCSI generic node '/dev/sg0' cannot "
                           "hold a 'tinyfmt' image: use 'raw' or no format"):  # fmt: skip
            bdrv_open(None, {"driver": "tinyfmt", "file": {"driver": "host_device",
                                                            "filename": "/dev/sg0"}})  # fmt: skip
        assert sg.use_count == 0  # the node was closed again
    finally:
        unregister_driver(drv.name)


def test_probing_puts_raw_on_an_sg_node(fake, sg) -> None:
    pytest.importorskip("blockcore_raw")
    bs = bdrv_open("/dev/sg0", None, OpenFlags.RDWR)
    try:
        assert bs.drv.name == "raw"
        assert bs.file.bs.drv.name == "host_device" and bdrv_is_sg(bs.file.bs)
    finally:
        bdrv_unref(bs)
