package engine

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// The memory an engine holds, for the node's memory budget (one OOM kill
// of the plugin stops the data path of every volume on the node):
//
//   - the block index, fixed at open: 8 bytes per cache position plus a
//     hash table of 4-byte slots at a load factor of at most 0.8, about
//     13 bytes per 4 KiB cache block (index.go);
//   - the RAM buffers, RAMBuffers x (4 KiB + segment size), a shared
//     mapping on tmpfs that the kernel charges to the process's memory
//     cgroup like heap (buffer.go);
//   - the writeback scratch: the data of the batch being written back
//     (at most nr_max_batched_writeback full segments' worth, and never
//     more than half the ring) plus one backing write of up to 4 MiB. It
//     is sized to the batch at hand and given back whenever writeback goes
//     idle, so an idle volume holds none; a budget must still reserve the
//     worst case, which a burst on every volume at once can reach.

// ErrUnaddressable is returned for a cache device bigger than the format
// can address: cache positions (segment slot x data blocks + block) are
// 32-bit, and the index stores position+1.
var ErrUnaddressable = errors.New("engine: cache device is too large for the cache format")

// MaxCachePositions is the most data blocks a cache can hold (about 16 TiB
// of 4 KiB blocks).
const MaxCachePositions = 1<<32 - 2

// Memory is what an engine holds in RAM, in bytes.
type Memory struct {
	Index   int64 `json:"index_bytes"`
	Buffers int64 `json:"buffer_bytes"`
	Scratch int64 `json:"scratch_bytes"`
}

// Total is the sum of the parts.
func (m Memory) Total() int64 { return m.Index + m.Buffers + m.Scratch }

// indexBytes is what newIndex(positions) allocates.
func indexBytes(positions uint64) int64 {
	return int64(positions)*8 + int64(positions+positions/4+1)*4
}

// checkAddressable refuses a geometry with more positions than the format
// can address.
func checkAddressable(g layout.Geometry) error {
	if p := g.NrSegments * uint64(g.DataBlocks()); p > MaxCachePositions {
		return fmt.Errorf("%w: %d segments of %d data blocks are %d cache blocks, the most is %d (%d bytes of %d-byte segments); use a smaller cache slice",
			ErrUnaddressable, g.NrSegments, g.DataBlocks(), p, uint64(MaxCachePositions),
			layout.RingOffset+int64(MaxCachePositions/uint64(g.DataBlocks()))*int64(g.SegmentSize), g.SegmentSize)
	}
	return nil
}

// EstimateMemory is the most an engine formatted on a cache device of
// cacheSize bytes can hold (segmentSize and ramBuffers 0: the defaults),
// whatever its tunables are set to while it runs: the figure a memory
// budget reserves before the cache is opened. A cache the format cannot
// address is refused with ErrUnaddressable.
func EstimateMemory(cacheSize int64, segmentSize, ramBuffers int) (Memory, error) {
	if segmentSize == 0 {
		segmentSize = layout.DefaultSegmentSize
	}
	if segmentSize < layout.MinSegmentSize || segmentSize > layout.MaxSegmentSize || segmentSize%blockSize != 0 {
		return Memory{}, fmt.Errorf("engine: segment size %d is not valid", segmentSize)
	}
	if cacheSize < layout.RingOffset+layout.MinSegments*int64(segmentSize) {
		return Memory{}, fmt.Errorf("engine: cache device of %d bytes is too small", cacheSize)
	}
	g := layout.Geometry{SegmentSize: segmentSize, NrSegments: uint64((cacheSize - layout.RingOffset) / int64(segmentSize))}
	if err := checkAddressable(g); err != nil {
		return Memory{}, err
	}
	if ramBuffers <= 0 {
		ramBuffers = defaultBuffers(g.NrSegments)
	}
	nd := uint64(g.DataBlocks())
	batchSegs := min(uint64(maxBatchedWriteback()), g.NrSegments/2+1)
	return Memory{
		Index:   indexBytes(g.NrSegments * nd),
		Buffers: int64(BufferBytes(segmentSize, ramBuffers)),
		Scratch: int64(batchSegs*nd*blockSize) + maxWritebackIO,
	}, nil
}

// maxBatchedWriteback is the largest nr_max_batched_writeback allowed
// (it can be raised online, so a reservation takes the maximum).
func maxBatchedWriteback() int {
	s, _ := LookupTunable("nr_max_batched_writeback")
	return s.Max
}

// scratchAlign rounds scratch sizes so small batches reuse one buffer.
const scratchAlign = 1 << 20

// wbScratchBuf returns the writeback's buffer for n bytes, growing it to
// the batch at hand. Only the writeback goroutine (and Open, before it
// starts) calls it.
func (e *Engine) wbScratchBuf(n int) []byte {
	if cap(e.wbScratch) < n {
		e.wbScratch = make([]byte, (n+scratchAlign-1)/scratchAlign*scratchAlign)
		e.wbScratchBytes.Store(int64(cap(e.wbScratch)))
	}
	return e.wbScratch[:n]
}

// releaseWbScratch gives the writeback buffer back when writeback goes
// idle.
func (e *Engine) releaseWbScratch() {
	if e.wbScratch != nil {
		e.wbScratch = nil
		e.wbScratchBytes.Store(0)
	}
}

// memoryLocked is what the engine holds now.
func (e *Engine) memoryLocked() Memory {
	m := Memory{Scratch: e.wbScratchBytes.Load()}
	if e.mu.idx != nil {
		m.Index = int64(e.mu.idx.bytes())
	}
	if e.mem != nil {
		m.Buffers = int64(len(e.mem.Bytes()))
	}
	return m
}

// scratchCounter is the size of the writeback buffer, read by Status
// while the writeback goroutine changes it.
type scratchCounter = atomic.Int64
