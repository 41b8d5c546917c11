package engine

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

const (
	blockSize       = layout.BlockSize
	sectorSize      = layout.SectorSize
	sectorsPerBlock = layout.SectorsPerBlock
	defaultBuffers  = 4
)

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
	nd    int    // data blocks per segment
	nseg  uint64 // segments in the ring
	size  int64  // bytes exposed (the backing size)

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
		err     error // sticky: the cache device failed; writes refuse
		wbErr   error // last writeback failure (backing device)
		closed  bool
		stop    bool // goroutines exit
		drains  int  // Drain calls in progress
		urgent  bool

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

	wg     sync.WaitGroup
	stopCh chan struct{} // closed when the goroutines must exit
}

// Open opens (recovering, or formatting when asked) the cache on
// opts.Cache for opts.Backing and starts its goroutines.
func Open(opts Options) (*Engine, error) {
	if opts.Cache == nil || opts.Backing == nil {
		return nil, errors.New("engine: cache and backing devices are required")
	}
	t := opts.Tunables
	if t == (Tunables{}) {
		t = DefaultTunables()
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	e := &Engine{
		cache:   opts.Cache,
		backing: &meteredDevice{Device: opts.Backing},
		name:    opts.Name,
		clock:   opts.Clock,
		boot:    bootID(),
		stopCh:  make(chan struct{}),
	}
	if e.clock == nil {
		e.clock = realClock{}
	}
	e.backing.clock = e.clock
	if opts.BackingDiscard {
		d, ok := opts.Backing.(blockdev.Discarder)
		if !ok {
			return nil, errors.New("engine: BackingDiscard asked, but the backing device cannot discard")
		}
		e.backingDiscard = d
	}
	e.cond.L = &e.mu.Mutex
	e.mu.tunables = t
	e.mu.discards = map[uint32]uint32{}
	e.mu.cells = map[uint64]struct{}{}

	if err := e.openSuperblock(opts); err != nil {
		return nil, err
	}
	nbuf := opts.RAMBuffers
	if nbuf <= 0 {
		nbuf = defaultBuffers
	}
	if uint64(nbuf) >= e.nseg {
		return nil, fmt.Errorf("engine: %d RAM buffers need a ring of more than %d segments", nbuf, e.nseg)
	}
	if err := e.setupBuffers(opts, nbuf); err != nil {
		return nil, err
	}
	ctx := opts.Context
	if ctx == nil {
		ctx = context.Background()
	}
	if err := e.recover(ctx); err != nil {
		if e.ownMem {
			e.mem.Close()
		}
		return nil, err
	}
	if t.WriteAroundMode && e.owedLocked() {
		// Write-around writes go straight to the backing device; dirty
		// blocks left by an earlier mode must reach it first so that no
		// stale cached copy can shadow a write-around write.
		klog.InfoS("write-around mode: writing back dirty blocks first", "volume", e.name, "dirtyBlocks", e.mu.nrDirty)
		for e.owedLocked() {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("engine: open: %w", err)
			}
			if _, err := e.writebackOnce(32, true); err != nil {
				return nil, err
			}
		}
	}
	klog.InfoS("cache opened", "volume", e.name, "uuid", fmt.Sprintf("%x", e.uuid), "segments", e.nseg,
		"segmentSize", e.geo.SegmentSize, "dirtyBlocks", e.mu.nrDirty, "lastWritebackID", e.mu.wbDoneID,
		"currentID", e.mu.nextID-1, "epoch", e.epoch)
	e.wg.Add(3)
	go e.flusher()
	go e.writebacker()
	go e.ticker()
	return e, nil
}

func (e *Engine) setupBuffers(opts Options, nbuf int) error {
	need := BufferBytes(e.geo.SegmentSize, nbuf)
	switch {
	case opts.Buffer != nil:
		if len(opts.Buffer.Bytes()) < need {
			return fmt.Errorf("engine: buffer memory holds %d bytes, %d buffers of this cache need %d", len(opts.Buffer.Bytes()), nbuf, need)
		}
		e.mem = opts.Buffer
	case opts.BufferPath != "":
		m, err := OpenBufferFile(opts.BufferPath, need)
		if err != nil {
			return err
		}
		e.mem, e.ownMem = m, true
	default:
		e.mem, e.ownMem = NewHeapBuffer(need), true
	}
	b := e.mem.Bytes()
	stride := ctrlSize + e.geo.SegmentSize
	e.mu.bufs = make([]*buffer, nbuf)
	for i := range e.mu.bufs {
		base := i * stride
		e.mu.bufs[i] = &buffer{ctrl: b[base : base+ctrlSize], seg: b[base+ctrlSize : base+stride]}
	}
	return nil
}

// owedLocked reports whether the backing device is owed anything: dirty
// blocks, or zero records not yet written back (discard.go).
func (e *Engine) owedLocked() bool { return e.mu.nrDirty > 0 || len(e.mu.discards) > 0 }

// Size is the size of the cached device in bytes.
func (e *Engine) Size() int64 { return e.size }

func (e *Engine) checkRange(off int64, n int64) error {
	if off < 0 || n < 0 || off+n > e.size {
		return fmt.Errorf("%w: offset %d length %d, device size %d", ErrOutOfRange, off, n, e.size)
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

func sectorMask(first, n int) uint8 {
	return uint8((1<<n - 1) << first)
}

// copySectors copies the sectors in mask from src to dst (whole blocks).
func copySectors(dst, src []byte, mask uint8) {
	if mask == 0xff {
		copy(dst[:blockSize], src[:blockSize])
		return
	}
	for mask != 0 {
		s := bits.TrailingZeros8(mask)
		n := bits.TrailingZeros8(^(mask >> s))
		copy(dst[s*sectorSize:(s+n)*sectorSize], src[s*sectorSize:(s+n)*sectorSize])
		mask &^= sectorMask(s, n)
	}
}

// WriteAt writes p at off. It returns once the data is in a RAM buffer;
// Flush (or WriteFUA) makes it durable.
func (e *Engine) WriteAt(p []byte, off int64) (int, error) {
	if err := e.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	if e.tunables().WriteAroundMode {
		return e.writeAround(p, off)
	}
	e.pace(len(p))
	e.mu.Lock()
	defer e.mu.Unlock()
	done := 0
	for done < len(p) {
		o := off + int64(done)
		blk := uint64(o / blockSize)
		first := int(o%blockSize) / sectorSize
		n := min(len(p)-done, blockSize-int(o%blockSize))
		if err := e.writeBlockLocked(blk, first, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// WriteFUA writes p at off and returns once it is durable.
func (e *Engine) WriteFUA(p []byte, off int64) error {
	if _, err := e.WriteAt(p, off); err != nil {
		return err
	}
	if e.tunables().WriteAroundMode {
		return nil // write-around writes are durable on return
	}
	return e.Flush()
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

// writeBlockLocked writes sectors [first, first+len(data)/512) of blk.
func (e *Engine) writeBlockLocked(blk uint64, first int, data []byte) error {
	mask := sectorMask(first, len(data)/sectorSize)
	full := mask == 0xff
	var old []byte // a copy of an older dirty version read from the cache device
	var oldPos uint32
	var oldSid uint64
	for {
		if err := e.usableLocked(); err != nil {
			return err
		}
		if len(e.mu.cells) > 0 {
			delete(e.mu.cells, blk)
		}
		pos, ok := e.mu.idx.lookup(blk)
		var m uint64
		if ok {
			m = e.mu.idx.meta[pos]
		}
		// Overwrite in place when the block is already in the open buffer
		// and not yet on the device.
		if ok && e.mu.cur != nil && e.mu.slotID[uint64(pos)/uint64(e.nd)] == e.mu.cur.id &&
			int(uint64(pos)%uint64(e.nd)) >= e.mu.cur.frozen {
			i := int(uint64(pos) % uint64(e.nd))
			b := e.mu.cur.block(i)
			copy(b[first*sectorSize:], data)
			newMask := metaMask(m) | mask
			if metaFlags(m)&flagDirty == 0 {
				newMask = 0xff // a staged clean block holds every sector
				e.mu.nrDirty++
			}
			e.mu.idx.meta[pos] = packMeta(blk, newMask, flagValid|flagDirty)
			layout.PutMetablock(e.mu.cur.seg[:blockSize], i, layout.Metablock{Block: blk, Mask: newMask, Kind: layout.KindData})
			e.countWrite(true, true, full)
			return nil
		}
		var merge uint8
		var src []byte
		if ok && (metaFlags(m)&flagDirty != 0 || e.mu.slotID[uint64(pos)/uint64(e.nd)] > e.mu.ckptWbID) {
			// A clean copy the log still replays is merged too: it was
			// marked clean by writeback (a gap fill, a batch that
			// yielded to the cleaner) while an older discard record of
			// the block may still be in the log, and recovery re-applies
			// that discard to the backing device, zeroing the sectors
			// this partial write leaves out.
			merge = metaMask(m) &^ mask
		}
		if merge != 0 {
			if b, inRAM := e.inRAMLocked(pos); inRAM {
				src = b.block(int(uint64(pos) % uint64(e.nd)))
			} else if old != nil && pos == oldPos && e.mu.slotID[uint64(pos)/uint64(e.nd)] == oldSid {
				src = old // entries on the cache device never change in place
			} else {
				// Read the older copy without the lock, then check that
				// nothing moved while we were away.
				slot := uint64(pos) / uint64(e.nd)
				sid := e.mu.slotID[slot]
				off := e.geo.DataBlockOffset(sid, int(uint64(pos)%uint64(e.nd)))
				if old == nil {
					old = make([]byte, blockSize)
				}
				e.mu.Unlock()
				_, err := e.cache.ReadAt(old, off)
				e.mu.Lock()
				if err != nil {
					e.mu.cacheErrors++
					return fmt.Errorf("%w: read cached block %d for a partial overwrite: %v", ErrIO, blk, err)
				}
				oldPos, oldSid = pos, sid
				continue // re-validate everything under the lock
			}
		}
		if retry, err := e.reserveLocked(); err != nil {
			return err
		} else if retry {
			continue
		}
		b := e.mu.cur.block(e.mu.cur.count)
		if !full && merge|mask != 0xff {
			clear(b) // sectors valid in neither copy: keep the segment deterministic
		}
		if merge != 0 {
			copySectors(b, src, merge)
		}
		copy(b[first*sectorSize:], data)
		e.commitLocked(blk, mask|merge, flagValid|flagDirty, layout.KindData, 0)
		e.countWrite(ok && metaFlags(m)&flagDirty != 0, false, full)
		return nil
	}
}

// dropLocked forgets the (already replaced or removed) entry at pos. by
// is the id of the segment whose entry replaces it, 0 when the replacement
// is durable on the backing device already (write-around).
func (e *Engine) dropLocked(pos uint32, by uint64) {
	m := e.mu.idx.meta[pos]
	if metaFlags(m)&flagDirty != 0 {
		e.mu.nrDirty--
		if slot := uint64(pos) / uint64(e.nd); by > e.mu.supersede[slot] {
			e.mu.supersede[slot] = by
		}
	}
	e.mu.idx.meta[pos] = m &^ (uint64(flagValid|flagDirty) << metaFlagShift)
}

func (e *Engine) countWrite(hit, inBuffer, full bool) {
	s := &e.mu.stats
	switch {
	case hit && inBuffer && full:
		s.WriteHitBufferFull++
	case hit && inBuffer:
		s.WriteHitBufferPartial++
	case hit && full:
		s.WriteHitCacheFull++
	case hit:
		s.WriteHitCachePartial++
	case full:
		s.WriteMissCacheFull++
	default:
		s.WriteMissCachePartial++
	}
}

// reserveLocked makes sure the open buffer has a free entry. retry means
// it had to wait (the lock was released), so the caller must look again.
func (e *Engine) reserveLocked() (retry bool, err error) {
	if e.roomLocked() {
		return false, nil
	}
	if e.mu.nextID > e.fgLimitLocked() {
		e.mu.urgent = true // the ring is full: writeback or cleaning must free a slot
		if e.mu.wbErr != nil {
			// Only writeback can free a slot and the backing device is
			// failing: surface the error instead of waiting for a device
			// that may never come back. Writes that fit keep succeeding;
			// a successful writeback clears wbErr.
			return false, e.mu.wbErr
		}
	}
	e.cond.Broadcast()
	e.cond.Wait()
	return true, e.usableLocked()
}

// roomLocked makes room in the open buffer if that needs no waiting.
// The foreground leaves the cleaner its reserve of the ring (clean.go).
func (e *Engine) roomLocked() bool { return e.roomUpToLocked(e.fgLimitLocked()) }

// roomUpToLocked is roomLocked for a writer that may open segments up to
// id limit.
func (e *Engine) roomUpToLocked(limit uint64) bool {
	if cur := e.mu.cur; cur != nil && cur.count < e.nd {
		return true
	}
	e.sealLocked()
	id := e.mu.nextID
	if id-e.mu.writtenID > uint64(len(e.mu.bufs)) || id > limit {
		return false
	}
	e.openBufferLocked(id)
	return true
}

// commitLocked publishes the next entry of the open buffer, whose data
// block the caller has filled: metablock, then count (see buffer.go), then
// the index.
func (e *Engine) commitLocked(blk uint64, mask, flags uint8, kind layout.Kind, length uint32) uint32 {
	cur := e.mu.cur
	i := cur.count
	pos := uint32(e.slotOf(cur.id)*uint64(e.nd) + uint64(i))
	e.mu.idx.meta[pos] = packMeta(blk, mask, flags)
	layout.PutMetablock(cur.seg[:blockSize], i, layout.Metablock{Block: blk, Mask: mask, Kind: kind, Length: length})
	cur.count++
	atomic.StoreUint32(ctrlCount(cur.ctrl), uint32(cur.count))
	e.mu.clean.LogBlocks++
	if flags&flagValid != 0 {
		if oldPos, replaced := e.mu.idx.insert(pos); replaced {
			e.dropLocked(oldPos, cur.id)
		}
		if flags&flagDirty != 0 {
			e.mu.nrDirty++
		}
	}
	return pos
}

// openBufferLocked starts segment id in its RAM buffer, evicting the clean
// blocks its ring slot still caches from the previous lap.
func (e *Engine) openBufferLocked(id uint64) {
	slot := e.slotOf(id)
	base := uint32(slot * uint64(e.nd))
	for i := 0; i < int(e.mu.slotCount[slot]); i++ {
		pos := base + uint32(i)
		m := e.mu.idx.meta[pos]
		if metaFlags(m)&flagValid != 0 {
			if metaFlags(m)&flagDirty != 0 {
				panic(fmt.Sprintf("engine: reusing slot %d with dirty block %d (segment %d, written back to %d)", slot, metaBlock(m), e.mu.slotID[slot], e.mu.ckptWbID))
			}
			e.mu.idx.remove(metaBlock(m), pos)
		}
		if metaFlags(m)&flagDiscard != 0 {
			e.removeZeroLocked(pos)
		}
		e.mu.idx.meta[pos] = 0
	}
	e.mu.slotID[slot] = id
	e.mu.slotCount[slot] = 0
	e.mu.supersede[slot] = 0
	b := e.bufFor(id)
	setCtrl(b.ctrl, e.uuid, e.boot, id)
	clear(b.seg[:blockSize])
	b.id, b.count, b.sealed = id, 0, false
	b.frozen, b.frozenCRC, b.durable, b.want, b.copyNext = 0, 0, 0, 0, 0
	e.mu.cur = b
	e.mu.nextID = id + 1
}

// sealLocked closes the open buffer and hands it to the flusher.
func (e *Engine) sealLocked() {
	cur := e.mu.cur
	if cur == nil {
		return
	}
	cur.sealed = true
	e.mu.slotCount[e.slotOf(cur.id)] = uint16(cur.count)
	e.mu.sealedID = cur.id
	e.mu.cur = nil
	e.cond.Broadcast()
}

// Flush returns once every write acknowledged before it was called is
// durable on the cache device. Concurrent calls share one segment write
// and one device flush.
func (e *Engine) Flush() error {
	start := e.clock.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.usableLocked(); err != nil {
		return err
	}
	// A part-full open buffer is written where it is and stays open
	// (partial write); a full one is sealed.
	var pid uint64
	var pcount int
	if cur := e.mu.cur; cur != nil && cur.count > 0 {
		if cur.count < e.nd {
			if cur.durable < cur.count {
				e.mu.nrPartialFlushed++
			}
			pid, pcount = cur.id, cur.count
			cur.want = max(cur.want, cur.count)
		} else {
			e.sealLocked()
		}
	}
	target := e.mu.sealedID
	if e.mu.flushReq < target {
		e.mu.flushReq = target
	}
	e.cond.Broadcast()
	for e.mu.flushedID < target || !e.partialDurableLocked(pid, pcount) {
		if e.mu.err != nil {
			return e.mu.err
		}
		e.cond.Wait()
	}
	e.mu.flushCount++
	e.mu.flushLatency += e.clock.Now().Sub(start)
	return nil
}

// partialDurableLocked reports whether the first n entries of segment id,
// open when a Flush asked for them, are durable. If the segment has been
// sealed since, that Flush now waits for the sealed segment instead.
func (e *Engine) partialDurableLocked(id uint64, n int) bool {
	if id == 0 || e.mu.flushedID >= id {
		return true
	}
	b := e.bufFor(id)
	if b.id == id && !b.sealed {
		return b.durable >= n
	}
	if e.mu.flushReq < id {
		e.mu.flushReq = id
		e.cond.Broadcast()
	}
	return false
}

// partialWantedLocked reports whether a Flush waits for entries of the
// open buffer that are not on the device yet.
func (e *Engine) partialWantedLocked() bool {
	cur := e.mu.cur
	return cur != nil && cur.want > cur.frozen
}

// flusher writes sealed buffers to the cache device in id order, writes
// the open buffer's new entries when a Flush waits for them, and makes
// both durable when a Flush asks.
func (e *Engine) flusher() {
	defer e.wg.Done()
	e.mu.Lock()
	defer e.mu.Unlock()
	hdr := make([]byte, blockSize) // header of a partial write: writers keep adding metablocks to the buffer's
	for {
		for e.mu.writtenID == e.mu.sealedID && e.mu.flushReq <= e.mu.flushedID && !e.partialWantedLocked() && e.mu.err == nil && !e.mu.stop {
			e.cond.Wait()
		}
		if e.mu.err != nil || (e.mu.stop && e.mu.writtenID == e.mu.sealedID && e.mu.flushReq <= e.mu.flushedID && !e.partialWantedLocked()) {
			return
		}
		from, to := e.mu.writtenID+1, e.mu.sealedID
		bufs := make([]*buffer, 0, to-from+1)
		for id := from; id <= to; id++ {
			bufs = append(bufs, e.bufFor(id))
		}
		e.mu.Unlock()
		var err error
		for _, b := range bufs {
			// Sealed: nothing changes the buffer any more.
			if _, err = e.writeSegment(b.id, b.seg[:blockSize], b.seg, b.frozen, b.count, b.copyNext, b.frozenCRC); err != nil {
				break
			}
		}
		e.mu.Lock()
		if err != nil {
			e.failLocked(err)
			continue
		}
		e.mu.writtenID = to
		e.cond.Broadcast()

		// The open buffer follows the sealed ones in the log, so its
		// partial write goes after them, and is made durable (below)
		// before the buffer is written again: a header copy is rewritten
		// only when the other one is durable.
		var p *buffer
		var pFrom, pCount, pCopy int
		var pCRC uint32
		if cur := e.mu.cur; e.partialWantedLocked() && cur.id == to+1 {
			p, pFrom, pCount, pCopy, pCRC = cur, cur.frozen, cur.count, cur.copyNext, cur.frozenCRC
			cur.frozen = pCount // from now on writers leave these entries alone
			copy(hdr, cur.seg[:blockSize])
		}
		if e.mu.flushReq <= e.mu.flushedID && p == nil {
			continue
		}
		wb := e.mu.wbDoneID
		if e.mu.ckptNeed > e.mu.flushedID {
			// Segments that replaced written-back entries are not durable
			// yet (they may be among those just written): this record
			// must not let recovery skip the replaced entries (makeDurable).
			wb = e.mu.ckptWbID
		}
		e.mu.Unlock()
		if p != nil {
			pCRC, err = e.writeSegment(p.id, hdr, p.seg, pFrom, pCount, pCopy, pCRC)
		}
		if err == nil {
			err = e.syncWithCheckpoint(wb, false)
		}
		e.mu.Lock()
		if err != nil {
			e.failLocked(err)
			continue
		}
		// The record just written claims only what was durable before
		// this flush. After a burst of segments (a bulk write, then one
		// flush) that would leave a crash recovery checking the data of
		// all of them; a second record, before the waiters are released,
		// bounds that to a few segments. An fsync-heavy load, a segment
		// or less per flush, never pays for it.
		if to > e.mu.ckptFlID+max(8, e.nseg/64) {
			if e.mu.ckptNeed > to {
				wb = e.mu.ckptWbID
			}
			e.mu.Unlock()
			err = e.checkpointUpTo(wb, to)
			e.mu.Lock()
			if err != nil {
				e.failLocked(err)
				continue
			}
		}
		e.mu.flushedID = to
		if p != nil {
			p.frozenCRC, p.copyNext, p.durable = pCRC, 1-pCopy, pCount
		}
		e.cond.Broadcast()
	}
}

// writeSegment writes entries [from, count) of segment id from its image
// seg, then hdr, sealed to describe all count entries, into header copy c.
// Entries before from are on the device already, unchanged, and crc is
// their data checksum. hdr holds the segment's metablocks: seg's own
// header block, or a copy of it while writers still add entries. It
// returns the data checksum of all count entries.
func (e *Engine) writeSegment(id uint64, hdr, seg []byte, from, count, c int, crc uint32) (uint32, error) {
	for i := from; i < count; i++ {
		if layout.GetMetablock(hdr, i).Kind.HasData() {
			crc = layout.UpdateDataCRC(crc, seg[(1+i)*blockSize:(2+i)*blockSize])
		}
	}
	layout.SealSegmentHeader(hdr, id, e.tag, e.epoch, count, crc)
	if c == 0 && from == 0 && &hdr[0] == &seg[0] {
		// The common case, a segment written once: one write.
		if _, err := e.cache.WriteAt(seg[:(1+count)*blockSize], e.geo.SegmentOffset(id)); err != nil {
			return 0, fmt.Errorf("write segment %d: %w", id, err)
		}
		return crc, nil
	}
	if from < count {
		if _, err := e.cache.WriteAt(seg[(1+from)*blockSize:(1+count)*blockSize], e.geo.DataBlockOffset(id, from)); err != nil {
			return 0, fmt.Errorf("write segment %d: %w", id, err)
		}
	}
	if _, err := e.cache.WriteAt(hdr[:blockSize], e.geo.HeaderOffset(id, c)); err != nil {
		return 0, fmt.Errorf("write segment %d header copy %d: %w", id, c, err)
	}
	return crc, nil
}

// syncWithCheckpoint writes a checkpoint record and flushes the cache
// device, making both it and every earlier write durable. The record
// claims only what was already durable before (last_flushed_id) and
// written back with the backing flushed (wb).
func (e *Engine) syncWithCheckpoint(wb uint64, clean bool) error {
	return e.writeCheckpoint(wb, 0, clean)
}

// checkpointUpTo is syncWithCheckpoint for a caller that knows segments
// up to flushed are durable before it has published that.
func (e *Engine) checkpointUpTo(wb, flushed uint64) error {
	return e.writeCheckpoint(wb, flushed, false)
}

func (e *Engine) writeCheckpoint(wb, flushedUpTo uint64, clean bool) error {
	e.ckptMu.Lock()
	defer e.ckptMu.Unlock()
	e.mu.Lock()
	// Callers read wb before taking ckptMu: a concurrent checkpoint may
	// have recorded a later one since. Never step back (restating a
	// durable checkpoint's wb is always safe), or recovery would look for
	// segments whose slots are reused already.
	wb = max(wb, e.mu.ckptWbID)
	flushed := max(e.mu.flushedID, flushedUpTo)
	if clean {
		// Close has made everything durable already: the log ends here.
		flushed = e.mu.writtenID
	}
	e.mu.Unlock()
	e.ckptSeq++
	c := layout.Checkpoint{UUID: e.uuid, Seq: e.ckptSeq, LastWritebackID: wb, LastFlushedID: flushed,
		Clean: clean, Epoch: e.epoch, Time: e.clock.Now().UnixNano()}
	buf := make([]byte, blockSize)
	c.Encode(buf)
	if _, err := e.cache.WriteAt(buf, layout.CheckpointOffsets[e.ckptSeq%2]); err != nil {
		return fmt.Errorf("write checkpoint: %w", err)
	}
	if err := e.cache.Flush(); err != nil {
		return fmt.Errorf("flush cache device: %w", err)
	}
	e.mu.Lock()
	if wb > e.mu.ckptWbID {
		e.mu.ckptWbID = wb
	}
	e.mu.ckptFlID = max(e.mu.ckptFlID, flushed)
	e.mu.lastCkpt = e.clock.Now()
	e.cond.Broadcast()
	e.mu.Unlock()
	return nil
}

// makeDurable makes the segments that replaced written-back entries
// durable on the cache device (ckptNeed), before a checkpoint lets
// recovery skip the replaced ones. Without it, a write flushed, then
// overwritten in a RAM buffer, then skipped by writeback (the overwrite is
// the newest copy) would be lost by a crash after the checkpoint: neither
// the backing device nor the log would hold it.
func (e *Engine) makeDurable() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	need := e.mu.ckptNeed
	if e.mu.flushedID >= need {
		return nil
	}
	if cur := e.mu.cur; cur != nil && cur.id <= need && cur.count > 0 {
		if cur.count < e.nd {
			e.mu.nrPartialFlushed++
		}
		e.sealLocked()
	}
	if e.mu.flushReq < need {
		e.mu.flushReq = need
		e.cond.Broadcast()
	}
	for e.mu.flushedID < need {
		if e.mu.err != nil {
			return e.mu.err
		}
		if e.mu.stop {
			return ErrClosed
		}
		e.cond.Wait()
	}
	return nil
}

// failLocked records a cache device failure: from now on writes and
// flushes fail with EIO instead of waiting forever.
func (e *Engine) failLocked(err error) {
	e.mu.cacheErrors++
	if e.mu.err == nil {
		e.mu.err = fmt.Errorf("%w: cache device: %v", ErrIO, err)
		klog.ErrorS(err, "cache device failed; the volume refuses writes", "volume", e.name)
	}
	e.cond.Broadcast()
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

// Close writes everything back to the cache device, records a clean
// shutdown and stops the engine. Dirty blocks stay in the cache.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.mu.closed {
		e.mu.Unlock()
		return ErrClosed
	}
	if cur := e.mu.cur; cur != nil && cur.count > 0 {
		e.sealLocked()
	}
	e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
	e.mu.closed = true
	e.mu.stop = true
	e.cond.Broadcast()
	e.mu.Unlock()
	close(e.stopCh)
	e.wg.Wait()

	e.mu.Lock()
	err := e.mu.err
	wb := e.mu.wbDoneID
	e.mu.Unlock()
	if err == nil {
		if err = e.syncWithCheckpoint(wb, true); err != nil {
			err = fmt.Errorf("%w: %v", ErrIO, err)
		}
	}
	if e.ownMem {
		if cerr := e.mem.Close(); err == nil && cerr != nil {
			err = cerr
		}
	}
	klog.InfoS("cache closed", "volume", e.name, "clean", err == nil, "err", err)
	return err
}
