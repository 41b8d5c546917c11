// Package inspect reads a writeboost cache device offline, without the
// engine, for `writeboost check` and `writeboost dump`: it verifies every
// structure of the on-disk format (pkg/layout) and describes what it finds.
//
// It never writes. It walks the log the way recovery does (from the
// checkpoint's last_writeback_id+1, in id order), but where recovery only
// needs to find the end of the log, the check also verifies the data
// checksum of every live segment and tells corruption from a torn tail: a
// segment the checkpoint records as durable (id <= last_flushed_id) must
// be intact; an invalid segment after it is where an unclean shutdown
// stopped, which recovery handles.
package inspect

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

const blockSize = layout.BlockSize

// CopyReport is the state of one copy of a duplicated structure.
type CopyReport struct {
	Offset int64  `json:"offset"`
	Valid  bool   `json:"valid"`
	Error  string `json:"error,omitempty"`
	Seq    uint64 `json:"seq,omitempty"`
}

// SegmentReport describes one segment of the live log.
type SegmentReport struct {
	ID         uint64            `json:"id"`
	Slot       uint64            `json:"slot"`
	Offset     int64             `json:"offset"`
	Epoch      uint32            `json:"epoch"`
	Count      int               `json:"count"`
	DataBlocks int               `json:"data_blocks"`
	Discards   int               `json:"discards"`
	HeaderOK   bool              `json:"header_ok"`
	HeaderCopy int               `json:"header_copy"` // the header copy described (0 first block, 1 last)
	DataCRCOK  bool              `json:"data_crc_ok"`
	Problem    string            `json:"problem,omitempty"`
	Durable    bool              `json:"durable"` // id <= checkpoint's last_flushed_id
	Metablocks []MetablockReport `json:"metablocks,omitempty"`
}

// MetablockReport is one metablock, for dump.
type MetablockReport struct {
	Index  int    `json:"index"`
	Kind   string `json:"kind"`
	Block  uint64 `json:"block"`
	Mask   string `json:"mask"`
	Length uint32 `json:"length,omitempty"`
}

// Report is the result of Check.
type Report struct {
	DeviceSize  int64              `json:"device_size"`
	Superblocks [2]CopyReport      `json:"superblocks"`
	Superblock  *layout.Superblock `json:"superblock,omitempty"`
	UUID        string             `json:"uuid,omitempty"`
	Checkpoints [2]CopyReport      `json:"checkpoints"`
	Checkpoint  *layout.Checkpoint `json:"checkpoint,omitempty"`
	Live        []SegmentReport    `json:"live_segments"`
	// LastID is the id of the last valid segment of the log.
	LastID uint64 `json:"last_id"`
	// Tail describes the segment slot after the log when it looked like
	// an interrupted write (an unclean shutdown), nil otherwise.
	Tail *SegmentReport `json:"torn_tail,omitempty"`
	// DirtyBlocks is the number of distinct backing blocks with dirty
	// data in the live log.
	DirtyBlocks uint64 `json:"dirty_blocks"`
	// Slots not in the live log, by what their header shows.
	WrittenBackSlots int `json:"written_back_slots"`
	BlankSlots       int `json:"blank_slots"`
	OtherSlots       int `json:"other_slots"`
	// Problems lists corruption; empty for a healthy cache.
	Problems []string `json:"problems"`
}

// Corrupt reports whether the check found corruption.
func (r *Report) Corrupt() bool { return len(r.Problems) > 0 }

// Options configure Check.
type Options struct {
	// Progress, when set, is called with segment slots done and total.
	Progress func(done, total uint64)
	// Metablocks includes every metablock of each live segment.
	Metablocks bool
}

// ErrNotCache is returned when the device holds no readable superblock:
// nothing further can be checked.
var ErrNotCache = errors.New("inspect: no valid writeboost superblock")

// Check verifies the cache device read through r (size bytes). It returns
// an error only when it cannot check at all (I/O error, no superblock);
// corruption is listed in the report.
func Check(r io.ReaderAt, size int64, o Options) (*Report, error) {
	rep := &Report{DeviceSize: size, Problems: []string{}}
	if size < 4*blockSize {
		return rep, fmt.Errorf("%w: device of %d bytes is too small", ErrNotCache, size)
	}
	two := make([]byte, 2*blockSize)
	if _, err := r.ReadAt(two, layout.SuperblockOffsets[0]); err != nil {
		return rep, fmt.Errorf("read superblocks: %w", err)
	}
	for i := range 2 {
		c := CopyReport{Offset: layout.SuperblockOffsets[i]}
		sb, err := layout.DecodeSuperblock(two[i*blockSize : (i+1)*blockSize])
		if err != nil {
			c.Error = err.Error()
		} else {
			c.Valid, c.Seq = true, sb.Seq
		}
		rep.Superblocks[i] = c
	}
	sb, err := layout.ChooseSuperblock(two[:blockSize], two[blockSize:])
	if err != nil {
		return rep, fmt.Errorf("%w: %v", ErrNotCache, err)
	}
	rep.Superblock = &sb
	rep.UUID = formatUUID(sb.UUID)
	for i, c := range rep.Superblocks {
		if !c.Valid {
			rep.Problems = append(rep.Problems, fmt.Sprintf("superblock copy %d at offset %d is invalid (%s); the other copy is used", i, c.Offset, c.Error))
		} else if c.Seq != sb.Seq {
			rep.Problems = append(rep.Problems, fmt.Sprintf("superblock copy %d is older (seq %d) than the other (seq %d)", i, c.Seq, sb.Seq))
		}
	}
	if int64(sb.CacheSize) > size {
		rep.Problems = append(rep.Problems, fmt.Sprintf("superblock says the cache device has %d bytes, it has %d", sb.CacheSize, size))
		return rep, nil
	}

	if _, err := r.ReadAt(two, layout.CheckpointOffsets[0]); err != nil {
		return rep, fmt.Errorf("read checkpoints: %w", err)
	}
	for i := range 2 {
		c := CopyReport{Offset: layout.CheckpointOffsets[i]}
		ck, err := layout.DecodeCheckpoint(two[i*blockSize : (i+1)*blockSize])
		switch {
		case err != nil:
			c.Error = err.Error()
		case ck.UUID != sb.UUID:
			c.Error = "belongs to another cache (UUID " + formatUUID(ck.UUID) + ")"
		default:
			c.Valid, c.Seq = true, ck.Seq
		}
		rep.Checkpoints[i] = c
	}
	ck, err := layout.ChooseCheckpoint(two[:blockSize], two[blockSize:], sb.UUID)
	if err != nil {
		rep.Problems = append(rep.Problems, fmt.Sprintf("no valid checkpoint record: %v", err))
		return rep, nil
	}
	rep.Checkpoint = &ck

	geo := sb.Geometry()
	nd := geo.DataBlocks()
	tag := layout.Tag(sb.UUID)
	live := map[uint64]bool{}
	dirty := map[uint64]struct{}{}
	hdr := make([]byte, blockSize)
	seg := make([]byte, geo.SegmentSize)
	id := ck.LastWritebackID + 1
	prevEpoch := uint32(0)
	var done uint64
	progress := func() {
		done++
		if o.Progress != nil {
			o.Progress(done, geo.NrSegments)
		}
	}
	for n := uint64(0); n < geo.NrSegments; n++ {
		if ck.Clean && id > ck.LastFlushedID {
			break
		}
		s := SegmentReport{ID: id, Slot: geo.SlotOf(id), Offset: geo.SegmentOffset(id), Durable: id <= ck.LastFlushedID}
		// One read per segment: a check is a sequential scan of the log.
		if _, err := r.ReadAt(seg, s.Offset); err != nil {
			return rep, fmt.Errorf("read segment %d: %w", id, err)
		}
		h, sameID := chooseCopy(&s, seg, id, tag, nd, prevEpoch, ck)
		if s.Problem != "" {
			if s.Durable {
				rep.Problems = append(rep.Problems, fmt.Sprintf("segment %d (slot %d, offset %d), recorded as durable by the checkpoint, is corrupt: %s", id, s.Slot, s.Offset, s.Problem))
				rep.Live = append(rep.Live, s)
			} else if s.HeaderOK || sameID {
				rep.Tail = &s // an interrupted write at the end of the log
			}
			break
		}
		for i, mb := range h.Metablocks {
			switch mb.Kind {
			case layout.KindData:
				s.DataBlocks++
				dirty[mb.Block] = struct{}{}
			case layout.KindZero, layout.KindTrim:
				s.Discards++
				end := mb.Block + uint64(mb.Length) // layout refuses overflow
				if uint64(mb.Length) <= uint64(len(dirty)) {
					for b := mb.Block; b < end; b++ {
						delete(dirty, b)
					}
				} else {
					// A discard may span 2^32 blocks (a whole-device
					// trim, or a damaged length): walk the dirty set
					// instead, or the check runs for minutes.
					for b := range dirty {
						if b >= mb.Block && b < end {
							delete(dirty, b)
						}
					}
				}
			}
			if o.Metablocks {
				s.Metablocks = append(s.Metablocks, metablockReport(i, mb))
			}
		}
		live[s.Slot] = true
		rep.Live = append(rep.Live, s)
		rep.LastID = id
		prevEpoch = h.Epoch
		id++
		progress()
	}
	if rep.LastID == 0 {
		rep.LastID = ck.LastWritebackID
	}
	if ck.Clean && rep.LastID < ck.LastFlushedID && len(rep.Problems) == 0 {
		rep.Problems = append(rep.Problems, fmt.Sprintf("clean shutdown recorded with segments up to %d, but the log ends at %d", ck.LastFlushedID, rep.LastID))
	}
	rep.DirtyBlocks = uint64(len(dirty))

	// Every other slot: only classified, never an error (old laps of the
	// ring, never-written slots).
	for slot := uint64(0); slot < geo.NrSegments; slot++ {
		if live[slot] {
			continue
		}
		off := geo.SegmentOffset(slot + 1)
		if _, err := r.ReadAt(hdr, off); err != nil {
			return rep, fmt.Errorf("read slot %d: %w", slot, err)
		}
		h, err := layout.DecodeSegmentHeader(hdr, nd)
		switch {
		case errors.Is(err, layout.ErrBlank):
			rep.BlankSlots++
		case err == nil && h.Tag == tag && h.ID <= ck.LastWritebackID:
			rep.WrittenBackSlots++
		default:
			rep.OtherSlots++
		}
		progress()
	}
	return rep, nil
}

// chooseCopy picks the header copy of segment id that recovery takes from
// the slot's contents seg (pkg/engine's recover: the newer run's, then
// the longer copy; beyond the checkpoint's last_flushed_id only this
// run's, with valid data, falling back to the other copy) and fills s. A
// durable segment's best copy must have valid data: it is the segment's
// completed last write. sameID reports whether a copy names segment id.
func chooseCopy(s *SegmentReport, seg []byte, id uint64, tag uint32, nd int, prevEpoch uint32, ck layout.Checkpoint) (h layout.SegmentHeader, sameID bool) {
	c0, c1 := seg[:blockSize], seg[len(seg)-blockSize:]
	cands := layout.SegmentCandidates(c0, c1, id, tag, nd)
	sameID = len(cands) > 0
	for _, c := range cands {
		h := c
		if h.Epoch < prevEpoch || h.Epoch > ck.Epoch || (!s.Durable && h.Epoch != ck.Epoch) {
			s.Problem = fmt.Sprintf("header copy %d: epoch %d outside [%d, %d]", h.Copy, h.Epoch, prevEpoch, ck.Epoch)
			continue
		}
		s.HeaderOK, s.HeaderCopy, s.Epoch, s.Count = true, h.Copy, h.Epoch, h.Count
		crc := h.ComputeDataCRC(seg[blockSize:])
		s.DataCRCOK = crc == h.DataCRC
		if s.DataCRCOK {
			s.Problem = ""
			return h, sameID
		}
		s.Problem = fmt.Sprintf("header copy %d: data checksum %08x, header says %08x", h.Copy, crc, h.DataCRC)
		if s.Durable {
			return h, sameID
		}
	}
	if len(cands) == 0 {
		h, err := layout.DecodeSegmentHeader(c0, nd)
		switch {
		case err != nil:
			s.Problem = fmt.Sprintf("header: %v", err)
		case h.ID != id:
			s.Problem = fmt.Sprintf("slot holds segment %d, not %d", h.ID, id)
		case h.Tag != tag:
			s.Problem = fmt.Sprintf("header tag %08x is not this cache's %08x", h.Tag, tag)
		}
	}
	return layout.SegmentHeader{}, sameID
}

// Segment reads the segment with the given id from its slot, with every
// metablock. It reports what the slot holds even when it is not that
// segment.
func Segment(r io.ReaderAt, sb layout.Superblock, id uint64) (SegmentReport, error) {
	if id == 0 {
		return SegmentReport{}, errors.New("segment ids start at 1")
	}
	geo := sb.Geometry()
	s := SegmentReport{ID: id, Slot: geo.SlotOf(id), Offset: geo.SegmentOffset(id)}
	seg := make([]byte, geo.SegmentSize)
	if _, err := r.ReadAt(seg, s.Offset); err != nil {
		return s, fmt.Errorf("read segment %d: %w", id, err)
	}
	tag := layout.Tag(sb.UUID)
	// Without the log around it, the best valid copy of this id: the
	// newer run's, then the longer one with valid data.
	cands := layout.SegmentCandidates(seg[:blockSize], seg[len(seg)-blockSize:], id, tag, geo.DataBlocks())
	var h layout.SegmentHeader
	if len(cands) > 0 {
		h = cands[0]
	}
	for _, c := range cands {
		if c.ComputeDataCRC(seg[blockSize:]) == c.DataCRC {
			h = c
			break
		}
	}
	if len(cands) == 0 {
		hd, err := layout.DecodeSegmentHeader(seg[:blockSize], geo.DataBlocks())
		if err != nil {
			s.Problem = fmt.Sprintf("header: %v", err)
			return s, nil
		}
		h = hd
		if h.ID != id {
			s.Problem = fmt.Sprintf("slot holds segment %d, not %d", h.ID, id)
		}
		if h.Tag != tag {
			s.Problem = fmt.Sprintf("header tag %08x is not this cache's", h.Tag)
		}
	}
	s.HeaderOK, s.HeaderCopy, s.Epoch, s.Count = true, h.Copy, h.Epoch, h.Count
	crc := h.ComputeDataCRC(seg[blockSize:])
	for i, mb := range h.Metablocks {
		switch mb.Kind {
		case layout.KindData:
			s.DataBlocks++
		case layout.KindZero, layout.KindTrim:
			s.Discards++
		}
		s.Metablocks = append(s.Metablocks, metablockReport(i, mb))
	}
	s.DataCRCOK = crc == h.DataCRC
	if !s.DataCRCOK && s.Problem == "" {
		s.Problem = fmt.Sprintf("data checksum %08x, header says %08x", crc, h.DataCRC)
	}
	return s, nil
}

func metablockReport(i int, mb layout.Metablock) MetablockReport {
	return MetablockReport{Index: i, Kind: mb.Kind.String(), Block: mb.Block, Mask: fmt.Sprintf("%08b", mb.Mask), Length: mb.Length}
}

func formatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
