package engine

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

const (
	blockSize       = layout.BlockSize
	sectorSize      = layout.SectorSize
	sectorsPerBlock = layout.SectorsPerBlock
	// maxDefaultBuffers RAM buffers of a segment each (8 MiB at 512 KiB
	// segments) by default: room for deep queues of large writes while the
	// flusher writes the sealed ones. With 4 (2 MiB, less than the 4 MiB a
	// 1 MiB QD4 writer keeps in flight) writers waited for room: 1 MiB
	// sequential QD4 through serve measured 1.35-1.46x faster with 16 than
	// with 4, side by side, and 32 added little (issue 15 §2).
	maxDefaultBuffers = 16
)

// defaultBuffers is the RAM buffers of a ring of nseg segments when none
// are asked for: maxDefaultBuffers, but at most a quarter of the ring (each
// sealed buffer waits for a slot of it), and the 4 of earlier versions
// where the ring has room for them.
func defaultBuffers(nseg uint64) int {
	n := min(maxDefaultBuffers, nseg/4)
	return int(max(n, min(4, nseg-1)))
}

// buffer is one RAM buffer: a segment being filled or waiting to be written.
//
// A flush writes the open buffer's entries so far to its slot without
// sealing it (layout: "A segment may be written more than once"), so a
// database's fsync after every small write costs a block and a header, not
// a whole segment. Entries below frozen are on the device: their data
// blocks and metablocks never change again, since a header copy's data
// checksum covers them; an overwrite of such a block takes a new entry.
type buffer struct {
	ctrl   []byte // control block in buffer memory
	seg    []byte // the segment in on-disk form: header copy 0, data blocks, room for copy 1
	id     uint64 // segment id held; 0 = none
	count  int    // entries used
	sealed bool

	frozen    int    // entries written to the cache device (immutable from here on)
	frozenCRC uint32 // data checksum of entries [0, frozen)
	durable   int    // entries a completed cache flush covered
	want      int    // entries a Flush waits for (partial writes)
	copyNext  int    // header copy the next write of this segment goes to
}

func (b *buffer) block(i int) []byte {
	return b.seg[(1+i)*blockSize : (2+i)*blockSize]
}

// Engine is a cached block device. It is safe for concurrent use.
type Engine struct {
	cache   blockdev.Device
	backing *meteredDevice
	name    string
	clock   Clock

	sb    layout.Superblock
	geo   layout.Geometry
	uuid  [16]byte
	tag   uint32
	epoch uint32
	boot  [16]byte
	nd    int          // data blocks per segment
	nseg  uint64       // segments in the ring
	size  atomic.Int64 // bytes exposed (the backing size); only goes up (grow.go)

	mem    BufferMemory
	ownMem bool

	backingDiscard blockdev.Discarder // nil: TRIM is not passed down

	// wbMu keeps writeback batches apart from the foreground's own writes
	// to the backing device: a write-around writes it (or zeroes it), a
	// passed-down trim discards it, then both drop index entries; neither
	// may interleave with a batch writing an older copy of the same blocks
	// back. Writeback holds it exclusively, write-arounds shared.
	wbMu      sync.RWMutex
	wbScratch []byte
	// wbScratchBytes is cap(wbScratch), for Status (memory.go).
	wbScratchBytes scratchCounter
	noFill         bool // tests: no gap filling (writeback.go)

	// growMu serialises Grow calls (grow.go): each rewrites the
	// superblock from the copy on the device.
	growMu sync.Mutex

	// ckptMu serialises checkpoint writes with the cache flush that makes
	// each durable, so the two alternating slots are never both unsynced.
	ckptMu  sync.Mutex
	ckptSeq uint64

	mu struct {
		sync.Mutex
		idx       *index
		slotID    []uint64 // segment id held by each ring slot (0 = none)
		slotCount []uint16 // entries in each slot's segment
		// supersede[slot]: the newest segment id holding a copy (or a
		// discard) that replaced a dirty entry of the slot's segment. A
		// replaced entry is not written back, so a checkpoint may pass
		// the slot only once that newer copy is durable (see ckptNeed).
		supersede []uint64
		ckptNeed  uint64 // the next checkpoint needs flushedID >= ckptNeed
		// discards: the pending zero records, position -> length (the
		// block is in the index's meta); zeroRuns their merged ranges,
		// rebuilt when zeroStale (discard.go).
		discards  map[uint32]uint32
		zeroRuns  []blockRange
		zeroStale bool
		bufs      []*buffer
		cur       *buffer // the buffer being filled, nil if none is open

		nextID    uint64 // id the next opened buffer gets
		sealedID  uint64 // every id <= sealedID is sealed
		writtenID uint64 // every id <= writtenID is written to the cache device
		flushedID uint64 // every id <= flushedID is durable on the cache device
		flushReq  uint64 // the flusher makes ids <= flushReq durable
		wbDoneID  uint64 // ids <= wbDoneID are written back and the backing flushed
		ckptWbID  uint64 // last_writeback_id of the newest durable checkpoint
		ckptFlID  uint64 // last_flushed_id of the newest durable checkpoint
		lastCkpt  time.Time

		nrDirty uint64
		err     error // sticky: the cache device failed (health.go)
		// What the volume serves since the cache failed (health.go):
		// passThrough, or stranded blocks fail; cacheCause is the
		// device's error.
		passThrough bool
		stranded    uint64
		cacheCause  error
		// lost: segments the checkpoint recorded as durable that
		// recovery found blank or corrupt (ids from-to).
		lost   struct{ n, from, to uint64 }
		wbErr  error // last writeback failure (backing device)
		closed bool
		stop   bool // goroutines exit
		drains int  // Drain calls in progress
		urgent bool

		tunables Tunables
		bgAllow  bool
		cells    map[uint64]struct{} // read-cache stagings in flight
		seqEnd   uint64              // block after the last read (sequential detection)
		seqRun   uint64

		stats            Counters
		nrPartialFlushed uint64
		wbBytes          uint64
		wbRate           float64
		// Pacing of foreground writes (pace.go).
		wbBlocksPerSec float64   // writeback speed while a batch runs (EWMA)
		paceNext       time.Time // when the next paced block may enter
		pacedWrites    uint64
		wbFilled       uint64         // blocks written back to fill gaps
		clean          CleaningStatus // cleaner counters (clean.go)
		cleanHold      time.Time      // background writeback waits until then (clean.go)
		batchBegan     time.Time      // start of the batch in progress
		batchDone      int            // blocks it has written so far
		flushCount     uint64
		flushLatency   time.Duration
		cacheErrors    uint64
		backingErrors  uint64
		util           float64
	}
	cond sync.Cond // on mu; broadcast on every state change

	step *stepper // stepping mode (tests): no goroutines, see step.go

	wg     sync.WaitGroup
	stopCh chan struct{} // closed when the goroutines must exit
}

// owedLocked reports whether the backing device is owed anything: dirty
// blocks, or zero records not yet written back (discard.go).
func (e *Engine) owedLocked() bool { return e.mu.nrDirty > 0 || len(e.mu.discards) > 0 }

// Size is the size of the cached device in bytes.
func (e *Engine) Size() int64 { return e.size.Load() }

func (e *Engine) checkRange(off int64, n int64) error {
	if size := e.size.Load(); off < 0 || n < 0 || off+n > size {
		return fmt.Errorf("%w: offset %d length %d, device size %d", ErrOutOfRange, off, n, size)
	}
	if off%sectorSize != 0 || n%sectorSize != 0 {
		return fmt.Errorf("%w: offset %d length %d", ErrUnaligned, off, n)
	}
	return nil
}

func (e *Engine) bufFor(id uint64) *buffer { return e.mu.bufs[id%uint64(len(e.mu.bufs))] }

func (e *Engine) slotOf(id uint64) uint64 { return (id - 1) % e.nseg }

// inRAMLocked reports whether position pos lives in a RAM buffer.
func (e *Engine) inRAMLocked(pos uint32) (*buffer, bool) {
	sid := e.mu.slotID[uint64(pos)/uint64(e.nd)]
	if sid > e.mu.writtenID {
		return e.bufFor(sid), true
	}
	return nil, false
}

func (e *Engine) tunables() Tunables {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.mu.tunables
}

func (e *Engine) usableLocked() error {
	if e.mu.closed {
		return ErrClosed
	}
	if e.mu.err != nil {
		return e.mu.err
	}
	return nil
}

// Err reports a device failure that makes the volume unhealthy.
func (e *Engine) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.mu.err != nil {
		return e.mu.err
	}
	return e.mu.wbErr
}
