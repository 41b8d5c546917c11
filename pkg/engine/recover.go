package engine

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// openSuperblock reads (or writes, when formatting) the superblock and
// sets the geometry.
func (e *Engine) openSuperblock(opts Options) error {
	two := make([]byte, 2*blockSize)
	if e.cache.Size() < layout.RingOffset+2*int64(layout.MinSegmentSize) {
		return fmt.Errorf("engine: cache device of %d bytes is too small (minimum %d)", e.cache.Size(), layout.RingOffset+2*layout.MinSegmentSize)
	}
	if _, err := e.cache.ReadAt(two, 0); err != nil {
		return fmt.Errorf("%w: read superblock: %v", ErrIO, err)
	}
	sb, err := layout.ChooseSuperblock(two[:blockSize], two[blockSize:])
	switch {
	case opts.Reformat, err != nil && errors.Is(err, layout.ErrBlank) && opts.Format:
		if sb, err = e.format(opts); err != nil {
			return err
		}
	case errors.Is(err, layout.ErrBlank):
		return fmt.Errorf("%w (open it with format enabled to create a cache)", ErrBlank)
	case errors.Is(err, layout.ErrNewerVersion):
		return fmt.Errorf("%w: %v", ErrNewerFormat, err)
	case errors.Is(err, layout.ErrBadMagic):
		return fmt.Errorf("%w: %v (reformat to overwrite it)", ErrForeign, err)
	case err != nil:
		return fmt.Errorf("%w: superblock: %v", ErrCorrupt, err)
	}
	if int64(sb.CacheSize) > e.cache.Size() {
		return fmt.Errorf("%w: the cache was made for a %d-byte cache device, this one has %d bytes", ErrCorrupt, sb.CacheSize, e.cache.Size())
	}
	bsize := e.backing.Size()
	if bsize/blockSize > maxBackingBlock+1 {
		return fmt.Errorf("%w: a backing device of %d bytes has more blocks than the index addresses (%d)", ErrUnaddressable, bsize, uint64(maxBackingBlock+1))
	}
	switch {
	case bsize == int64(sb.BackingSize):
	case bsize > int64(sb.BackingSize) && opts.AllowBackingGrowth:
		grown := sb
		grown.BackingSize = uint64(bsize / blockSize * blockSize)
		grown.Seq++
		if err := e.writeSuperblock(grown); err != nil {
			return err
		}
		klog.InfoS("backing device grew", "volume", e.name, "from", sb.BackingSize, "to", grown.BackingSize)
		sb = grown
	default:
		return fmt.Errorf("%w: the cache was made for a %d-byte backing device, this one has %d bytes", ErrBackingSize, sb.BackingSize, bsize)
	}
	if err := checkAddressable(sb.Geometry()); err != nil {
		return err
	}
	if sb.Version < layout.Version {
		// Before anything newer than its version is written (a trim
		// record): a binary that knows only the older version then
		// refuses the cache instead of misreading its log.
		up := sb
		up.Version = layout.Version
		up.Seq++
		if err := e.writeSuperblock(up); err != nil {
			return err
		}
		klog.InfoS("cache format upgraded", "volume", e.name, "from", sb.Version, "to", up.Version)
		sb = up
	}
	e.sb = sb
	e.geo = sb.Geometry()
	e.uuid = sb.UUID
	e.tag = layout.Tag(sb.UUID)
	e.nd = e.geo.DataBlocks()
	e.nseg = e.geo.NrSegments
	e.size.Store(int64(sb.BackingSize))
	return nil
}

func (e *Engine) format(opts Options) (layout.Superblock, error) {
	segSize := opts.SegmentSize
	if segSize == 0 {
		segSize = layout.DefaultSegmentSize
	}
	var uuid [16]byte
	if _, err := rand.Read(uuid[:]); err != nil {
		return layout.Superblock{}, err
	}
	uuid[6] = uuid[6]&0x0f | 0x40 // RFC 4122 version 4
	uuid[8] = uuid[8]&0x3f | 0x80
	bsize := e.backing.Size() / blockSize * blockSize
	sb, err := layout.NewSuperblock(e.cache.Size(), bsize, segSize, uuid, e.clock.Now().UnixNano())
	if err != nil {
		return sb, fmt.Errorf("engine: format: %w", err)
	}
	if err := checkAddressable(sb.Geometry()); err != nil {
		return sb, fmt.Errorf("engine: format: %w", err)
	}
	// Checkpoints and superblocks of an earlier cache go first; the new
	// superblock is written last, so a crash mid-format leaves no cache
	// that looks valid. Old segments carry another cache's tag.
	zero := make([]byte, 4*blockSize)
	if _, err := e.cache.WriteAt(zero, 0); err != nil {
		return sb, fmt.Errorf("%w: format: %v", ErrIO, err)
	}
	if err := e.cache.Flush(); err != nil {
		return sb, fmt.Errorf("%w: format: %v", ErrIO, err)
	}
	if err := e.writeSuperblock(sb); err != nil {
		return sb, err
	}
	klog.InfoS("cache formatted", "volume", e.name, "uuid", fmt.Sprintf("%x", uuid), "segments", sb.NrSegments, "segmentSize", segSize, "backingSize", bsize)
	return sb, nil
}

// writeSuperblock writes the two copies one after the other, each made
// durable before the next, so a torn write can only hit one of them.
func (e *Engine) writeSuperblock(sb layout.Superblock) error {
	buf := make([]byte, blockSize)
	sb.Encode(buf)
	for _, off := range []int64{layout.SuperblockOffsets[1], layout.SuperblockOffsets[0]} {
		if _, err := e.cache.WriteAt(buf, off); err != nil {
			return fmt.Errorf("%w: write superblock: %v", ErrIO, err)
		}
		if err := e.cache.Flush(); err != nil {
			return fmt.Errorf("%w: write superblock: %v", ErrIO, err)
		}
	}
	return nil
}

// recover rebuilds the in-memory state from the checkpoint and the log,
// then from RAM buffers a killed process left behind.
//
// The log is walked from last_writeback_id+1 in id order and ends at the
// first slot where neither header copy carries the expected id, this
// cache's tag, a valid header checksum, an epoch no older than the
// previous segment's nor newer than the checkpoint's, and, for segments
// beyond last_flushed_id (not known durable when the checkpoint was
// written), exactly the checkpoint's epoch and a valid data checksum. Of
// two such copies the newer run's, then the longer, wins; if its data
// checksum fails, the other (layout: a copy is rewritten only once the
// other is durable). Segments are written in id order and a flush covers
// every segment before it, so nothing after a torn segment was covered by
// a completed flush. The epoch (bumped and recorded at every open before
// any segment is written) rejects a stale segment or copy that a crashed
// earlier run left beyond the end of the log it recovered.
//
// Only headers are read for segments up to last_flushed_id (copy 1 only
// when copy 0 is not a full segment); after a clean shutdown the log ends
// exactly there, so an open reads about (segments in use) x 4 KiB, not the
// whole device.
func (e *Engine) recover(ctx context.Context) error {
	two := make([]byte, 2*blockSize)
	if _, err := e.cache.ReadAt(two, layout.CheckpointOffsets[0]); err != nil {
		return fmt.Errorf("%w: read checkpoint: %v", ErrIO, err)
	}
	ck, err := layout.ChooseCheckpoint(two[:blockSize], two[blockSize:], e.uuid)
	if err != nil {
		return fmt.Errorf("%w: checkpoint: %v", ErrCorrupt, err)
	}
	e.ckptSeq = ck.Seq
	e.epoch = ck.Epoch + 1
	e.mu.wbDoneID, e.mu.ckptWbID = ck.LastWritebackID, ck.LastWritebackID
	positions := int(e.nseg) * e.nd
	e.mu.idx = newIndex(positions)
	e.mu.slotID = make([]uint64, e.nseg)
	e.mu.slotCount = make([]uint16, e.nseg)
	e.mu.supersede = make([]uint64, e.nseg)

	var lastSeg readSegment // the last segment of the log
	var fixes []readSegment // copies to make agree (below)
	id := ck.LastWritebackID + 1
	prevEpoch := uint32(0)
	for n := uint64(0); n < e.nseg; n++ {
		if ck.Clean && id > ck.LastFlushedID {
			break
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("engine: recovery: %w", err)
		}
		r, ok, err := e.readSegmentHeader(id, ck, prevEpoch)
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		e.applySegmentLocked(id, 0, r.h.Metablocks)
		prevEpoch = r.h.Epoch
		lastSeg = r
		if r.otherDiffers {
			fixes = append(fixes, r)
		}
		id++
	}
	last := id - 1
	if ck.Clean && last < ck.LastFlushedID {
		return fmt.Errorf("%w: the cache was shut down cleanly with segments up to %d, but only %d are readable", ErrCorrupt, ck.LastFlushedID, last)
	}
	if last < ck.LastFlushedID {
		// Every segment up to last_flushed_id was durable before the
		// checkpoint was written, so none of them may be missing after
		// a crash: a cache device that acknowledged flushes it did not
		// do (a volatile write cache that lies, a virtual disk with
		// cache=unsafe) lost them, and the writes they held with them.
		// The log ends before them, as it must (what follows is not
		// trusted); say so loudly rather than open as if all were well.
		e.mu.lost.n, e.mu.lost.from, e.mu.lost.to = ck.LastFlushedID-last, last+1, ck.LastFlushedID
		klog.ErrorS(nil, "cache recovery: log segments recorded as durable are blank or corrupt; the cache device lost writes it acknowledged as flushed (does it ignore flushes?); data written before the crash may be lost, check the filesystem",
			"volume", e.name, "lostSegments", e.mu.lost.n, "fromID", last+1, "toID", ck.LastFlushedID, "lastWritebackID", ck.LastWritebackID)
	}

	// Header copies are rewritten below only once the copies recovery
	// took are durable.
	if err := e.cache.Flush(); err != nil {
		return fmt.Errorf("%w: flush cache device: %v", ErrIO, err)
	}
	// The rest of the last segment from a RAM buffer of a killed process,
	// if the segment was still open (its partial writes are on the
	// device): written into the other header copy, as the flusher would
	// have, with the segment's own epoch, since a crash before this open's
	// checkpoint must find it valid under the old one.
	extended := false
	if lastSeg.h.ID == last && last > 0 {
		var err error
		if extended, err = e.extendLastSegment(lastSeg); err != nil {
			return err
		}
	}
	// Any other copy of an accepted segment that is a valid header of the
	// same id, but was passed over (torn data, an older or unrecorded run),
	// takes the accepted header. Once this open's checkpoint counts the
	// segment as durable, recovery no longer checks its data, so no
	// copy of it may be valid but wrong.
	for _, r := range fixes {
		if extended && r.h.ID == last {
			continue // the extension rewrote it
		}
		if _, err := e.cache.WriteAt(r.raw, e.geo.HeaderOffset(r.h.ID, 1-r.h.Copy)); err != nil {
			return fmt.Errorf("%w: rewrite header copy %d of segment %d: %v", ErrIO, 1-r.h.Copy, r.h.ID, err)
		}
	}
	if extended || len(fixes) > 0 {
		if err := e.cache.Flush(); err != nil {
			return fmt.Errorf("%w: flush cache device: %v", ErrIO, err)
		}
	}

	// RAM buffers of a killed process, newer than the log on the device.
	replay := e.buffersToReplay(last)
	replayed := 0
	if len(replay) > 0 {
		// Record this run's epoch before writing any segment, so that a
		// crash in the middle leaves replayed segments a later open tells
		// from older runs' leftovers.
		e.mu.flushedID = last
		if err := e.syncWithCheckpoint(ck.LastWritebackID, false); err != nil {
			return fmt.Errorf("%w: %v", ErrIO, err)
		}
	}
	for _, b := range replay {
		id := last + 1
		if id > e.ckptLimit() {
			klog.ErrorS(nil, "RAM buffers left by a killed process do not fit the log ring; their writes are lost",
				"volume", e.name, "buffers", len(replay)-replayed)
			break
		}
		if _, err := e.writeSegment(id, b.seg[:blockSize], b.seg, 0, b.count, 0, 0); err != nil {
			return fmt.Errorf("%w: replay RAM buffer: %v", ErrIO, err)
		}
		e.applySegmentLocked(id, 0, metablocks(b.seg[:blockSize], 0, b.count))
		last = id
		replayed++
	}
	if err := e.cache.Flush(); err != nil {
		return fmt.Errorf("%w: flush cache device: %v", ErrIO, err)
	}
	// Zero records still in the log are pending again (applySegmentLocked):
	// reads of their ranges are zeros, and writeback zeroes the backing
	// device when it passes them, as before the crash. Nothing is zeroed
	// here, so an open never waits for an HDD to write zeros.
	e.mu.nextID = last + 1
	e.mu.sealedID, e.mu.writtenID, e.mu.flushedID, e.mu.flushReq = last, last, last, last
	for i := range e.mu.bufs {
		clear(e.mu.bufs[i].ctrl[:8]) // replayed: never again
	}
	// From here on the log may grow: record the new epoch and that this is
	// no longer a clean shutdown before writing any segment.
	if err := e.syncWithCheckpoint(ck.LastWritebackID, false); err != nil {
		return fmt.Errorf("%w: %v", ErrIO, err)
	}
	klog.InfoS("cache recovered", "volume", e.name, "cleanShutdown", ck.Clean, "lastWritebackID", ck.LastWritebackID,
		"lastID", last, "replayedRAMBuffers", replayed, "extendedOpenSegment", extended, "headerCopiesMadeAgree", len(fixes),
		"dirtyBlocks", e.mu.nrDirty)
	return nil
}

type replayBuf struct {
	id    uint64
	count int
	seg   []byte
}

// buffersToReplay returns the RAM buffers, left by a killed process of this
// boot, that continue the log after last, in id order.
func (e *Engine) buffersToReplay(last uint64) []replayBuf {
	var found []replayBuf
	for _, b := range e.mu.bufs {
		id, count, ok := readCtrl(b.ctrl, e.uuid, e.boot)
		if !ok || id <= last || count == 0 || count > e.nd {
			continue
		}
		found = append(found, replayBuf{id: id, count: count, seg: b.seg})
	}
	slices.SortFunc(found, func(a, b replayBuf) int { return int(a.id - b.id) })
	var out []replayBuf
	for _, f := range found {
		if f.id != last+1+uint64(len(out)) {
			break // a gap: what follows was never acknowledged after it
		}
		out = append(out, f)
	}
	return out
}

func (e *Engine) ckptLimit() uint64 { return e.mu.wbDoneID + e.nseg }

// applySegmentLocked replays metablocks first, first+1, ... of segment id
// into the index.
func (e *Engine) applySegmentLocked(id uint64, first int, mbs []layout.Metablock) {
	slot := e.slotOf(id)
	base := uint32(slot*uint64(e.nd)) + uint32(first)
	for i, mb := range mbs {
		pos := base + uint32(i)
		switch mb.Kind {
		case layout.KindData:
			e.mu.idx.meta[pos] = packMeta(mb.Block, mb.Mask, flagValid|flagDirty)
			if old, replaced := e.mu.idx.insert(pos); replaced {
				e.dropLocked(old, 0)
			}
			e.mu.nrDirty++
		case layout.KindZero:
			e.dropRangeLocked(mb.Block, mb.Block+uint64(mb.Length), 0)
			e.mu.idx.meta[pos] = packMeta(mb.Block, 0, flagDiscard)
			e.addZeroLocked(pos, mb.Length)
		case layout.KindTrim:
			e.dropRangeLocked(mb.Block, mb.Block+uint64(mb.Length), 0)
			e.mu.idx.meta[pos] = 0
		default:
			// Read-cache copies are not trusted across an open: a write
			// that bypassed them (write-around) is not in the log.
			e.mu.idx.meta[pos] = 0
		}
	}
	e.mu.slotID[slot] = id
	e.mu.slotCount[slot] = uint16(first + len(mbs))
}

// metablocks returns metablocks [from, to) of a header block.
func metablocks(hdr []byte, from, to int) []layout.Metablock {
	mbs := make([]layout.Metablock, to-from)
	for i := range mbs {
		mbs[i] = layout.GetMetablock(hdr, from+i)
	}
	return mbs
}

// readSegment is the header copy recovery takes for a segment.
type readSegment struct {
	h   layout.SegmentHeader
	raw []byte // its header block
	// otherDiffers: the other copy is a valid header of the same segment
	// that was passed over.
	otherDiffers bool
}

// readSegmentHeader reads the header copies of segment id and returns the
// one recovery takes (see recover), ok false where the log ends.
func (e *Engine) readSegmentHeader(id uint64, ck layout.Checkpoint, prevEpoch uint32) (readSegment, bool, error) {
	hdrs := make([]byte, 2*blockSize)
	c := [2][]byte{hdrs[:blockSize], hdrs[blockSize:]}
	if _, err := e.cache.ReadAt(c[0], e.geo.HeaderOffset(id, 0)); err != nil {
		return readSegment{}, false, fmt.Errorf("%w: read segment %d: %v", ErrIO, id, err)
	}
	durable := id <= ck.LastFlushedID
	if h, err := layout.DecodeSegmentHeader(c[0], e.nd); err == nil && durable && h.ID == id && h.Tag == e.tag &&
		h.Count == e.nd && h.Epoch >= prevEpoch && h.Epoch <= ck.Epoch {
		// A full copy is the segment's last write; a durable segment's
		// last write is complete, and no other copy of it can be valid
		// but wrong (recover makes the copies agree first).
		return readSegment{h: h, raw: c[0]}, true, nil
	}
	if _, err := e.cache.ReadAt(c[1], e.geo.HeaderOffset(id, 1)); err != nil {
		return readSegment{}, false, fmt.Errorf("%w: read segment %d: %v", ErrIO, id, err)
	}
	cands := layout.SegmentCandidates(c[0], c[1], id, e.tag, e.nd)
	for _, h := range cands {
		if h.Epoch < prevEpoch || h.Epoch > ck.Epoch || (!durable && h.Epoch != ck.Epoch) {
			continue
		}
		if !durable {
			ok, err := e.dataCRCMatches(id, h)
			if err != nil {
				return readSegment{}, false, err
			}
			if !ok {
				continue // torn
			}
		}
		return readSegment{h: h, raw: c[h.Copy], otherDiffers: len(cands) == 2 && string(c[0]) != string(c[1])}, true, nil
	}
	return readSegment{}, false, nil
}

// dataCRCMatches reads the data blocks h counts and checks its data
// checksum.
func (e *Engine) dataCRCMatches(id uint64, h layout.SegmentHeader) (bool, error) {
	d := make([]byte, h.Count*blockSize)
	if _, err := e.cache.ReadAt(d, e.geo.DataBlockOffset(id, 0)); err != nil {
		return false, fmt.Errorf("%w: read segment %d: %v", ErrIO, id, err)
	}
	return h.ComputeDataCRC(d) == h.DataCRC, nil
}

// extendLastSegment writes the entries of the log's last segment that a
// RAM buffer left by a killed process holds beyond what the device has
// (the buffer was open, and its partial writes reached the device). The
// entries the device has must match the buffer's, which never change once
// written; otherwise the buffer is not trusted.
func (e *Engine) extendLastSegment(r readSegment) (bool, error) {
	h := r.h
	for _, b := range e.mu.bufs {
		id, count, ok := readCtrl(b.ctrl, e.uuid, e.boot)
		if !ok || id != h.ID || count <= h.Count || count > e.nd {
			continue
		}
		ram := b.seg[:blockSize]
		for i, mb := range h.Metablocks {
			if layout.GetMetablock(ram, i) != mb {
				klog.ErrorS(nil, "RAM buffer disagrees with the segment on the cache device; not replaying it",
					"volume", e.name, "segment", id, "entry", i)
				return false, nil
			}
		}
		if h.ComputeDataCRC(b.seg[blockSize:]) != h.DataCRC {
			klog.ErrorS(nil, "RAM buffer data disagrees with the segment on the cache device; not replaying it",
				"volume", e.name, "segment", id)
			return false, nil
		}
		epoch := e.epoch
		e.epoch = h.Epoch // the segment's run, as if the flusher had finished
		_, err := e.writeSegment(id, ram, b.seg, h.Count, count, 1-h.Copy, h.DataCRC)
		e.epoch = epoch
		if err != nil {
			return false, fmt.Errorf("%w: replay RAM buffer: %v", ErrIO, err)
		}
		e.applySegmentLocked(id, h.Count, metablocks(ram, h.Count, count))
		return true, nil
	}
	return false, nil
}
