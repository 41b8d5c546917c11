#!/usr/bin/env python3
"""Exercise writeboost's NBD server through python3-libnbd.

Usage: libnbd_semantics.py URI_RW URI_RO

Checks the advertised capabilities, FLUSH, FUA writes, TRIM and
WRITE_ZEROES (with NO_HOLE and FUA) semantics, server-side error codes for
out-of-range and read-only requests (with libnbd's client-side checks
off), and many concurrent requests over several connections. Exits non-zero
with a message on the first failure.
"""
import errno
import os
import sys
import threading

import nbd


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def expect_errno(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        # Depending on the binding version, errno is a number or a name.
        if e.errno not in (want, errno.errorcode[want]):
            fail("%s: errno %s, want %s (%s)" % (what, e.errno, want, e))
        return
    fail("%s: succeeded, want errno %d" % (what, want))


def main():
    uri_rw, uri_ro = sys.argv[1], sys.argv[2]
    h = connect(uri_rw)
    size = h.get_size()
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        if not getattr(h, cap)():
            fail("%s is false" % cap)
    if h.is_read_only():
        fail("rw export is read-only")
    if h.get_block_size(nbd.SIZE_MINIMUM) != 512 or h.get_block_size(nbd.SIZE_PREFERRED) != 4096:
        fail("block sizes %d/%d" % (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED)))
    # The server advertises 512-byte blocks but accepts any alignment (not
    # every client honours block sizes); let unaligned requests through.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)

    # FUA write, plain write + flush, read back.
    a = os.urandom(65536)
    h.pwrite(a, 4096, nbd.CMD_FLAG_FUA)
    b = os.urandom(12345)
    h.pwrite(b, 1 << 20)
    h.flush()
    if h.pread(len(a), 4096) != a or h.pread(len(b), 1 << 20) != b:
        fail("data read back differs")

    # Unaligned small I/O (the server accepts any alignment).
    h.pwrite(b"xyz", 7)
    if h.pread(5, 6) != b"\0xyz\0":
        fail("unaligned write")

    # TRIM leaves the range unspecified until written (it costs the
    # backing device nothing): it reads back as zeros or as earlier data
    # of the same range, never anything else, and a later write wins.
    # WRITE_ZEROES always reads back as zeros, with or without NO_HOLE
    # and FUA.
    h.trim(8192, 4096)
    if h.pread(4096, 8192) not in (bytes(4096), a[4096:8192]):
        fail("trimmed range reads neither zeros nor its earlier data")
    h.pwrite(b"\x5a" * 4096, 8192)
    if h.pread(4096, 8192) != b"\x5a" * 4096:
        fail("write after trim")
    h.pwrite(a[4096:8192], 8192)
    h.pwrite(b"\xff" * 65536, 2 << 20)
    h.zero(4096, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, (2 << 20) + 8192, nbd.CMD_FLAG_FUA)
    got = h.pread(65536, 2 << 20)
    want = bytes(4096) + b"\xff" * 4096 + bytes(4096) + b"\xff" * (65536 - 3 * 4096)
    if got != want:
        fail("write_zeroes ranges wrong")

    # Server-side errors, with libnbd's own checks switched off so the
    # requests reach the server.
    h.set_strict_mode(0)
    expect_errno(lambda: h.pread(4096, size - 512), errno.EINVAL, "read past end")
    expect_errno(lambda: h.pwrite(bytes(4096), size - 512), errno.ENOSPC, "write past end")
    expect_errno(lambda: h.trim(4096, size), errno.EINVAL, "trim past end")
    h.pread(512, 0)  # the connection is still usable
    h.shutdown()

    ro = connect(uri_ro)
    if not ro.is_read_only() or ro.can_trim() or ro.can_zero() or ro.can_fua():
        fail("read-only export advertises write features")
    ro.set_strict_mode(0)
    expect_errno(lambda: ro.pwrite(bytes(512), 0), errno.EPERM, "write to read-only export")
    ro.shutdown()

    # Concurrency: several connections, each keeping many requests in
    # flight on its own region, then everything checked from a fresh one.
    nconn, depth, chunk = 4, 32, 4096
    region = 8 << 20
    base = 16 << 20
    if base + nconn * region > size:
        fail("export too small for the concurrency test")
    shadows = [bytearray(region) for _ in range(nconn)]
    errors = []

    def worker(i):
        try:
            c = connect(uri_rw)
            rnd = os.urandom(region)
            shadows[i][:] = rnd
            bufs = []
            for off in range(0, region, chunk):
                while c.aio_in_flight() >= depth:
                    c.poll(-1)
                buf = nbd.Buffer.from_bytearray(bytearray(rnd[off:off + chunk]))
                bufs.append(buf)
                c.aio_pwrite(buf, base + i * region + off)
            while c.aio_in_flight() > 0:
                c.poll(-1)
            c.flush()
            reads = []
            for off in range(0, region, 65536):
                while c.aio_in_flight() >= depth:
                    c.poll(-1)
                buf = nbd.Buffer(65536)
                reads.append((off, buf, c.aio_pread(buf, base + i * region + off)))
            while c.aio_in_flight() > 0:
                c.poll(-1)
            for off, buf, cookie in reads:
                if not c.aio_command_completed(cookie):
                    errors.append("read not completed")
                if buf.to_bytearray() != shadows[i][off:off + 65536]:
                    errors.append("conn %d: data differs at %d" % (i, off))
                    break
            c.shutdown()
        except Exception as e:  # reported below
            errors.append("conn %d: %r" % (i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nconn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        fail("; ".join(errors[:5]))

    v = connect(uri_rw)
    for i in range(nconn):
        if v.pread(region, base + i * region) != bytes(shadows[i]):
            fail("conn %d region differs on a fresh connection" % i)
    v.shutdown()
    print("ok")


if __name__ == "__main__":
    main()
