package pool

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Ways ZeroRange zeroed a range, as logged and counted.
const (
	// ZeroOffload: the device zeroed it itself (WRITE ZEROES, or an unmap
	// that reads back zeros), asked with fallocate(PUNCH_HOLE), which on a
	// block device never falls back to writing.
	ZeroOffload = "offload"
	// ZeroWrite: BLKZEROOUT, which on a device without WRITE ZEROES makes
	// the kernel write zero pages (an HDD at ~180 MB/s: 1.6 h per TiB).
	ZeroWrite = "zeroout"
	// ZeroHole: a hole punched in a regular file.
	ZeroHole = "hole"
)

// setLowIOPriority puts the calling thread at the lowest best-effort I/O
// priority (ioprio_set(IOPRIO_WHO_PROCESS, 0, BE level 7)). Not the idle
// class: on a disk that is never idle it would starve, and the space
// would never come back.
func setLowIOPriority() error {
	const whoProcess, classBE, classShift, lowest = 1, 2, 13, 7
	if _, _, errno := unix.Syscall(unix.SYS_IOPRIO_SET, whoProcess, 0, classBE<<classShift|lowest); errno != 0 {
		return errno
	}
	return nil
}

// ZeroRange makes [off, off+n) of the block device or file at path read
// as zeros and syncs it. It asks for the cheapest way the device offers:
// on a block device fallocate(PUNCH_HOLE|KEEP_SIZE), which the kernel
// turns into an offloaded zeroing or fails with EOPNOTSUPP, then
// BLKZEROOUT; on a file a punched hole.
func ZeroRange(path string, off, n int64) (string, error) {
	if n <= 0 {
		return ZeroOffload, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	fd := int(f.Fd())
	method := ZeroOffload
	if fi.Mode()&os.ModeDevice == 0 {
		method = ZeroHole
	}
	err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err != nil && fi.Mode()&os.ModeDevice != 0 && (errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.EINVAL)) {
		method = ZeroWrite
		rng := [2]uint64{uint64(off), uint64(n)}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&rng))); errno != 0 {
			err = fmt.Errorf("BLKZEROOUT: %w", errno)
		} else {
			err = nil
		}
	}
	if err != nil {
		return method, fmt.Errorf("zero %s [%d, +%d): %w", path, off, n, err)
	}
	if err := f.Sync(); err != nil {
		return method, fmt.Errorf("sync %s: %w", path, err)
	}
	return method, nil
}
