package engine

import (
	"errors"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// ErrCannotGrow is returned by Grow when the backing device cannot take
// a new size while open (it does not implement blockdev.Grower).
var ErrCannotGrow = errors.New("engine: the backing device cannot grow while open")

// Grow makes a live volume size bytes, a multiple of 4096 not below its
// current size, once the storage under the backing device has grown (the
// pool's Expand, made durable first). I/O goes on throughout; requests
// beyond the old size are refused until Grow returns.
//
// Crash safety rests on the superblock alone: the backing device is grown
// first (its new range reads as zeros: the pool's promise, so nothing of
// another tenant shows), then the superblock is rewritten with the new
// backing size and a higher sequence, its two copies one after the other,
// each made durable before the next (writeSuperblock), and only then does
// the engine accept requests beyond the old end. A crash before the first
// copy is durable recovers the old size, after it the new one; either way
// every block reads what it held, and the blocks past the old end read
// zeros, since no write reached them before Grow returned. Nothing in the
// log, the checkpoints or the index depends on the backing size, so no
// other structure changes. When Grow returns nil the new size is durable.
//
// A Grow to the current size does nothing (retries converge); a smaller
// size is refused with ErrOutOfRange.
func (e *Engine) Grow(size int64) error {
	e.growMu.Lock()
	defer e.growMu.Unlock()
	e.mu.Lock()
	err := e.usableLocked()
	e.mu.Unlock()
	if err != nil {
		return err
	}
	cur := e.size.Load()
	switch {
	case size == cur:
		return nil
	case size < cur:
		return fmt.Errorf("%w: grow to %d bytes: the volume already has %d and does not shrink", ErrOutOfRange, size, cur)
	case size%blockSize != 0:
		return fmt.Errorf("%w: grow to %d bytes: not a multiple of %d", ErrOutOfRange, size, blockSize)
	case size/blockSize > maxBackingBlock+1:
		return fmt.Errorf("%w: a backing device of %d bytes has more blocks than the index addresses (%d)", ErrUnaddressable, size, uint64(maxBackingBlock+1))
	}
	if e.backing.Size() < size {
		g, ok := e.backing.Device.(blockdev.Grower)
		if !ok {
			return fmt.Errorf("%w (grow to %d bytes)", ErrCannotGrow, size)
		}
		if err := g.Grow(size); err != nil {
			return fmt.Errorf("%w: grow the backing device to %d bytes: %v", ErrIO, size, err)
		}
		if e.backing.Size() < size {
			return fmt.Errorf("%w: the backing device has %d bytes after growing it to %d", ErrIO, e.backing.Size(), size)
		}
	}
	// Rewrite the superblock on the device as it is now: a retry after a
	// failure between the two copies finds the newer one.
	two := make([]byte, 2*blockSize)
	if _, err := e.cache.ReadAt(two, 0); err != nil {
		return fmt.Errorf("%w: grow: read superblock: %v", ErrIO, err)
	}
	sb, err := layout.ChooseSuperblock(two[:blockSize], two[blockSize:])
	if err != nil {
		return fmt.Errorf("%w: grow: superblock: %v", ErrCorrupt, err)
	}
	if sb.UUID != e.uuid {
		return fmt.Errorf("%w: grow: the superblock names cache %x, this engine opened %x", ErrCorrupt, sb.UUID, e.uuid)
	}
	if int64(sb.BackingSize) != size {
		from := sb.BackingSize
		sb.BackingSize = uint64(size)
		sb.Seq++
		if err := e.writeSuperblock(sb); err != nil {
			return err
		}
		klog.InfoS("volume grown", "volume", e.name, "from", from, "to", size)
	}
	e.size.Store(size)
	return nil
}
