// Package blockdev is the one seam between the cache engine and storage.
//
// Every device the engine touches (the NVMe cache, the HDD backing store,
// the simulated HDD of tests and benchmarks, and the crashable in-memory
// device of the crash sweeps) implements Device. The durability promises
// are written on each method; the engine's crash-safety argument relies on
// nothing else, so an implementation must keep them exactly.
package blockdev

import "errors"

// SectorSize is the smallest unit of I/O the engine issues or accepts.
const SectorSize = 512

// ErrUnsupported is returned by optional operations a device cannot do.
var ErrUnsupported = errors.New("blockdev: operation not supported")

// Device is a fixed-size random-access block device.
//
// Offsets and lengths passed by the engine are multiples of SectorSize.
// Methods are safe for concurrent use; concurrent writes to overlapping
// ranges have no defined order.
type Device interface {
	// ReadAt reads len(p) bytes at off. It returns the data most recently
	// written to each sector (durable or not). A short read is an error.
	ReadAt(p []byte, off int64) (int, error)

	// WriteAt writes len(p) bytes at off. When it returns, the data is
	// visible to ReadAt but NOT durable: after a power loss any subset of
	// the sectors written since the last completed Flush may hold their
	// old contents, and a write may be torn at any SectorSize boundary.
	// A single sector is never torn.
	WriteAt(p []byte, off int64) (int, error)

	// Flush makes every write that returned before Flush was called
	// durable: after it returns nil, those writes survive a power loss.
	// Writes that race with Flush may or may not be covered.
	Flush() error

	// Zero makes [off, off+length) read back as zeros, like a WriteAt of
	// zeros (same durability: only a later Flush makes it durable). It
	// may deallocate the range (punch a hole, discard) where that still
	// guarantees zeros. Devices that cannot do better than writing zeros
	// do that.
	Zero(off, length int64) error

	// Size is the device's size in bytes, a multiple of SectorSize.
	Size() int64

	// Close releases the device. It does not imply Flush.
	Close() error
}
