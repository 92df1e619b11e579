#!/usr/bin/env python3
"""The virtio fuzz targets' seed corpus, written as a driver would act, in the input
layout of ``fuzz/targets.py`` (:func:`targets._virtio`): each seed completes at least one
request on its device (tests/test_fuzz_targets.py checks it), so coverage-guided runs
start from inputs that reach the device's request code rather than from random bytes.

    fuzz/seeds.py            # rewrite fuzz/corpus/virtio_*/seed-*
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmm.p9 import wire as W9  # noqa: E402
from kvmm.virtio import blk as B  # noqa: E402
from kvmm.virtio import net as N  # noqa: E402
from kvmm.virtio import pci_legacy as L  # noqa: E402

R, W = False, True  # a descriptor the device reads, or writes


class Input:
    """Builds one input: ``flags[1] features[4]``, then operations (targets._virtio)."""

    def __init__(self, msix: bool = False, features: int = 0) -> None:
        self.buf = bytearray([1 if msix else 0]) + features.to_bytes(4, "little")

    @property
    def data(self) -> bytes:
        return bytes(self.buf)

    def chain(self, queue: int, *descs: tuple, indirect: bool = False) -> Input:
        """A descriptor chain of ``(length, writable[, contents])``, published and kicked."""
        self.buf += bytes([4, queue, len(descs) - 1])
        for i, (length, writable, *contents) in enumerate(descs):
            flags = (1 if writable else 0) | (2 if indirect and i == 0 else 0)
            self.buf += struct.pack("<HB", length, flags)
            if not writable:
                body = contents[0] if contents else b""
                assert len(body) <= 64 and len(body) <= length
                self.buf += bytes([len(body)]) + body
        return self

    def host_input(self, blob: bytes) -> Input:
        self.buf += bytes([5, len(blob)]) + blob
        return self

    def reg_read(self, offset: int, size: int) -> Input:
        self.buf += bytes([1, offset, (1, 2, 4).index(size)])
        return self

    def reg_write(self, offset: int, size: int, value: int) -> Input:
        self.buf += bytes([0, offset, (1, 2, 4).index(size)]) + value.to_bytes(4, "little")
        return self

    def avail_idx(self, queue: int, value: int) -> Input:
        self.buf += bytes([6, queue, 1]) + value.to_bytes(2, "little")
        return self

    def kick(self, queue: int) -> Input:
        self.buf += bytes([3, queue])
        return self

    def restart(self) -> Input:
        self.buf += bytes([7])
        return self


def blk_header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def frame(n: int = 60) -> bytes:
    return bytes.fromhex("ffffffffffff 525400123456 0800") + bytes(n - 14)


def p9(mtype: int, tag: int, fmt: str = "", *values: object) -> bytes:
    return W9.encode(mtype, tag, fmt, *values)


def twalk(tag: int, fid: int, newfid: int, *names: bytes) -> bytes:
    body = struct.pack("<IIH", fid, newfid, len(names)) + b"".join(struct.pack("<H", len(n)) + n for n in names)
    return struct.pack("<IBH", 7 + len(body), W9.TWALK, tag) + body


def seeds() -> dict[str, dict[str, bytes]]:
    v9 = p9(W9.TVERSION, W9.NOTAG, "ds", 65536, W9.VERSION)
    attach = p9(W9.TATTACH, 1, "ddssd", 0, W9.NOFID, b"u", b"", 0)
    reply = (8192, W)
    mrg = 1 << N.VIRTIO_NET_F_MRG_RXBUF
    return {
        "virtio_blk": {
            "read": Input().chain(0, (16, R, blk_header(B.VIRTIO_BLK_T_IN)), (512, W), (1, W)).data,
            "write-read": Input().chain(0, (16, R, blk_header(B.VIRTIO_BLK_T_OUT, 1)), (512, R, b"fuzz" * 16), (1, W))
                                 .chain(0, (16, R, blk_header(B.VIRTIO_BLK_T_IN, 1)), (512, W), (1, W)).data,
            "id-flush-unsupported": Input(msix=True).chain(0, (16, R, blk_header(B.VIRTIO_BLK_T_GET_ID)), (20, W), (1, W))
                                           .chain(0, (16, R, blk_header(B.VIRTIO_BLK_T_FLUSH)), (1, W))
                                           .chain(0, (16, R, blk_header(99)), (1, W)).data,
            "indirect-then-bad-ring": Input().reg_read(L.CONFIG, 4)
                                             .chain(0, (16, R, blk_header(B.VIRTIO_BLK_T_IN, 8)), (4096, W), (1, W), indirect=True)
                                             .avail_idx(0, 0x1000).kick(0).data,
        },
        "virtio_net": {
            "tx": Input().chain(N.TX_QUEUE, (N.VNET_HDR_LEN + 60, R, bytes(N.VNET_HDR_LEN) + frame(54))).data,
            "rx": Input().chain(N.RX_QUEUE, (1526, W)).host_input(bytes(N.VNET_HDR_LEN) + frame()).data,
            "rx-mergeable": Input(features=mrg).chain(N.RX_QUEUE, (1526, W)).chain(N.RX_QUEUE, (1526, W))
                                               .host_input(bytes(N.MRG_HDR_LEN) + frame()).data,
            "tx-two-buffers-msix": Input(msix=True).chain(N.TX_QUEUE, (N.VNET_HDR_LEN, R, bytes(N.VNET_HDR_LEN)),
                                                          (60, R, frame())).data,
        },
        "virtio_console": {
            "tx": Input().chain(1, (5, R, b"hello")).data,
            "rx": Input().chain(0, (64, W)).host_input(b"typed input").data,
            "input-first-msix": Input(msix=True).host_input(b"early").chain(0, (16, W)).chain(1, (2, R, b"ok")).data,
        },
        "virtio_rng": {
            "one": Input().chain(0, (64, W)).data,
            "two-buffers-indirect": Input().chain(0, (16, W), (4096, W), indirect=True).data,
            "msix-restart": Input(msix=True).chain(0, (32, W)).restart().chain(0, (8, W)).data,
        },
        # virtio_9p: its first byte is the share's mode (bit 0 read-only), then the layout.
        "virtio_9p": {
            "version-attach-read": b"\0" + Input().chain(0, (len(v9), R, v9), reply).chain(0, (len(attach), R, attach), reply)
                                                  .chain(0, (23, R, twalk(2, 0, 1, b"file")), reply)
                                                  .chain(0, (15, R, p9(W9.TLOPEN, 3, "dd", 1, 0)), reply)
                                                  .chain(0, (23, R, p9(W9.TREAD, 4, "dqd", 1, 0, 4096)), (11, W), (4096, W)).data,
            "read-only-mkdir": b"\1" + Input().chain(0, (len(v9), R, v9), reply).chain(0, (len(attach), R, attach), reply)
                                              .chain(0, (64, R, p9(W9.TMKDIR, 2, "dsdd", 0, b"new", 0o755, 0)), reply).data,
            "walk-up-getattr-msix": b"\0" + Input(msix=True).chain(0, (len(v9), R, v9), reply)
                                                   .chain(0, (len(attach), R, attach), reply)
                                                   .chain(0, (64, R, twalk(2, 0, 1, b"dir", b"up", b"..", b"..")), reply)
                                                   .chain(0, (64, R, p9(W9.TGETATTR, 3, "dq", 1, 0x3FFF)), reply).data,
        },
    }


def main() -> None:
    for target, inputs in seeds().items():
        corpus = ROOT / "fuzz" / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        for old in corpus.glob("seed*"):
            old.unlink()
        for name, data in inputs.items():
            (corpus / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
