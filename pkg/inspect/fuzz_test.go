package inspect

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"sync"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// FuzzCheck damages a real cache image (written by the engine) and checks
// it. pkg/layout's fuzz targets cover the decoding of each block; this one
// covers what Check and Segment build on top: walking the log, the data
// checksums, the dirty-block count, and the report. Edits come in two
// flavours: raw byte flips (checksums catch them) and re-sealed structural
// edits (metablocks, segment ids and epochs, checkpoint and superblock
// fields, all through layout's own encoders), which reach the logic behind
// the checksums. Check must never panic or hang, fail only with
// ErrNotCache, and produce a report that is self-consistent, agrees with
// Segment and survives its JSON encoding.

const (
	fuzzCacheSize   = 3 << 20
	fuzzSegmentSize = 64 << 10
)

var (
	baseOnce  sync.Once
	baseImage []byte
	baseErr   error
)

// base is a cache with live, durable segments holding data and discard
// metablocks, left unclean (as after a crash following a flush).
func base() ([]byte, error) {
	baseOnce.Do(func() {
		cache := blockdev.NewMem(fuzzCacheSize, nil)
		backing := blockdev.NewMem(8<<20, nil)
		tun := engine.DefaultTunables()
		tun.WritebackThreshold = 0 // keep everything in the log
		e, err := engine.Open(engine.Options{Cache: cache, Backing: backing, Format: true,
			SegmentSize: fuzzSegmentSize, Tunables: tun})
		if err != nil {
			baseErr = err
			return
		}
		buf := make([]byte, layout.BlockSize)
		for i := 0; i < 40 && err == nil; i++ {
			buf[0], buf[100] = byte(i), byte(i*7)
			_, err = e.WriteAt(buf, int64(i*3)*layout.BlockSize)
			if err == nil && i%9 == 8 {
				err = e.Trim(int64(i-4)*layout.BlockSize, 6*layout.BlockSize)
			}
		}
		if err == nil {
			err = e.Flush()
		}
		if err != nil {
			baseErr = err
			return
		}
		img := make([]byte, fuzzCacheSize)
		if _, err := cache.ReadAt(img, 0); err != nil {
			baseErr = err
			return
		}
		baseImage = img
		// The engine is abandoned, not closed: the image stays unclean.
	})
	return baseImage, baseErr
}

// editor applies fuzz-chosen edits to an image.
type editor struct {
	img []byte
	in  []byte
}

func (e *editor) byte() byte {
	if len(e.in) == 0 {
		return 0
	}
	b := e.in[0]
	e.in = e.in[1:]
	return b
}

func (e *editor) u32() uint32 {
	var b [4]byte
	for i := range b {
		b[i] = e.byte()
	}
	return binary.LittleEndian.Uint32(b[:])
}

func (e *editor) u64() uint64 { return uint64(e.u32()) | uint64(e.u32())<<32 }

// block returns the image's block at off; outside the image (an edited
// superblock may describe a larger ring) a scratch block, so the edit is
// lost rather than the harness panicking.
func (e *editor) block(off int64) []byte {
	if off < 0 || off+layout.BlockSize > int64(len(e.img)) {
		return make([]byte, layout.BlockSize)
	}
	return e.img[off : off+layout.BlockSize]
}

// xor flips bits of the image's byte at off, if the image has it.
func (e *editor) xor(off int64, x byte) {
	if off >= 0 && off < int64(len(e.img)) {
		e.img[off] ^= x
	}
}

func (e *editor) superblock() (layout.Superblock, bool) {
	sb, err := layout.ChooseSuperblock(e.block(layout.SuperblockOffsets[0]), e.block(layout.SuperblockOffsets[1]))
	return sb, err == nil
}

// segment picks a ring slot by fuzz byte and returns its header block.
func (e *editor) segment(sb layout.Superblock) ([]byte, int64) {
	g := sb.Geometry()
	slot := uint64(e.byte()) % g.NrSegments
	off := g.SegmentOffset(slot + 1)
	return e.block(off), off
}

// reseal recomputes a header's checksums after an edit: the data checksum
// over the blocks its metablocks now describe (when fixData), then the
// header's.
func (e *editor) reseal(hdr []byte, off int64, id uint64, tag, epoch uint32, count int, dataCRC uint32, fixData bool) {
	if fixData {
		dataCRC = 0
		for i := 0; i < count; i++ {
			if layout.GetMetablock(hdr, i).Kind.HasData() {
				dataCRC = layout.UpdateDataCRC(dataCRC, e.block(off+int64(1+i)*layout.BlockSize))
			}
		}
	}
	layout.SealSegmentHeader(hdr, id, tag, epoch, count, dataCRC)
}

func (e *editor) apply() {
	for n := 0; len(e.in) > 0 && n < 16; n++ {
		op := e.byte()
		sb, ok := e.superblock()
		switch op % 6 {
		case 0: // flip a byte in the metadata area or a segment header
			off := int64(e.u32()) % int64(len(e.img))
			if op&0x80 == 0 && ok {
				_, hoff := e.segment(sb)
				off = hoff + off%layout.BlockSize
			} else if op&0x40 == 0 {
				off %= 4 * layout.BlockSize
			}
			e.xor(off, e.byte()|1)
		case 1: // rewrite (or append) a metablock and reseal
			if !ok {
				continue
			}
			hdr, off := e.segment(sb)
			h, err := layout.DecodeSegmentHeader(hdr, sb.Geometry().DataBlocks())
			if err != nil {
				continue
			}
			count := h.Count
			i := int(e.byte()) % (count + 1)
			if i == count {
				if count >= sb.Geometry().DataBlocks() {
					continue
				}
				count++
			}
			m := layout.Metablock{Kind: layout.Kind(e.byte() % 4), Block: e.u64() % (sb.BackingSize / layout.BlockSize * 2), Mask: e.byte()}
			if m.Kind == layout.KindZero {
				m.Mask, m.Length = 0, e.u32()|1
			} else if m.Kind.HasData() && m.Mask == 0 {
				m.Mask = 0xFF
			}
			if m.Kind == layout.KindClean {
				m.Mask = 0xFF
			}
			layout.PutMetablock(hdr, i, m)
			e.reseal(hdr, off, h.ID, h.Tag, h.Epoch, count, h.DataCRC, op&0x80 == 0)
		case 2: // change a segment's id, epoch or count and reseal
			if !ok {
				continue
			}
			hdr, off := e.segment(sb)
			h, err := layout.DecodeSegmentHeader(hdr, sb.Geometry().DataBlocks())
			if err != nil {
				continue
			}
			id := h.ID + uint64(int8(e.byte()))
			epoch := h.Epoch + uint32(int8(e.byte()))
			count := h.Count
			if op&0x40 != 0 && count > 0 {
				count--
			}
			e.reseal(hdr, off, id, h.Tag, epoch, count, h.DataCRC, op&0x80 == 0)
		case 3: // write a new checkpoint record with edited fields
			if !ok {
				continue
			}
			ck, err := layout.ChooseCheckpoint(e.block(layout.CheckpointOffsets[0]), e.block(layout.CheckpointOffsets[1]), sb.UUID)
			if err != nil {
				continue
			}
			ck.Seq++
			ck.LastWritebackID += uint64(int8(e.byte()))
			ck.LastFlushedID += uint64(int8(e.byte()))
			ck.Epoch += uint32(int8(e.byte()))
			ck.Clean = op&0x80 != 0
			if op&0x40 != 0 {
				ck.LastWritebackID = e.u64()
			}
			ck.Encode(e.block(layout.CheckpointOffsets[ck.Slot()]))
		case 4: // write a superblock copy with an edited geometry
			if !ok {
				continue
			}
			sb.Seq++
			switch e.byte() % 4 {
			case 0:
				sb.NrSegments = uint64(e.byte())
			case 1:
				sb.SegmentSize = uint32(e.byte()) * layout.BlockSize
			case 2:
				sb.CacheSize = uint64(e.u32()) * layout.BlockSize
			case 3:
				sb.BackingSize = uint64(e.u32()) * layout.BlockSize
			}
			sb.Encode(e.block(layout.SuperblockOffsets[e.byte()%2]))
		case 5: // damage a data block of a segment
			if !ok {
				continue
			}
			_, off := e.segment(sb)
			i := int64(e.byte()) % int64(sb.Geometry().DataBlocks())
			e.xor(off+(1+i)*layout.BlockSize+int64(e.byte()), 0x40)
		}
	}
}

func FuzzCheck(f *testing.F) {
	img, err := base()
	if err != nil {
		f.Fatal(err)
	}
	rep, err := Check(bytes.NewReader(img), int64(len(img)), Options{})
	if err != nil || rep.Corrupt() || len(rep.Live) < 3 || rep.DirtyBlocks == 0 {
		f.Fatalf("base image: %+v, %v", rep, err)
	}
	discards := 0
	for _, s := range rep.Live {
		discards += s.Discards
	}
	if discards == 0 {
		f.Fatal("base image has no discard metablocks")
	}
	f.Add([]byte{})
	f.Add([]byte{0x00, 1, 0, 0, 0, 0x10})                      // flip a header byte of slot 1
	f.Add([]byte{0x01, 0, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0xFF}) // rewrite a metablock, resealed
	f.Add([]byte{0x01, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF})
	f.Add([]byte{0x02, 1, 3, 0})    // segment id +3
	f.Add([]byte{0x02, 0, 0, 0xFF}) // epoch -1
	f.Add([]byte{0x03, 0xFF, 0, 0}) // checkpoint: last written back -1
	f.Add([]byte{0x83, 0, 0x10, 0}) // clean checkpoint beyond the log
	f.Add([]byte{0x43, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF})
	f.Add([]byte{0x04, 0, 200, 0})        // superblock: more segments than fit
	f.Add([]byte{0x04, 1, 4, 1})          // superblock: smaller segments
	f.Add([]byte{0x04, 2, 0, 0, 1, 0, 0}) // superblock: larger cache than the device
	f.Add([]byte{0x05, 2, 3, 9})          // a data block of slot 2
	f.Fuzz(func(t *testing.T, edits []byte) {
		e := &editor{img: bytes.Clone(img), in: edits}
		e.apply()
		r := bytes.NewReader(e.img)
		rep, err := Check(r, int64(len(e.img)), Options{Metablocks: true})
		if err != nil {
			if !errors.Is(err, ErrNotCache) {
				t.Fatalf("Check failed with %v, not ErrNotCache", err)
			}
			return
		}
		if len(edits) == 0 && rep.Corrupt() {
			t.Fatalf("undamaged image reported corrupt: %v", rep.Problems)
		}
		rep.WriteText(io.Discard)

		// The report is what `check --json` prints: it must round-trip.
		b, err := json.Marshal(rep)
		if err != nil {
			t.Fatal(err)
		}
		var again Report
		if err := json.Unmarshal(b, &again); err != nil || !reflect.DeepEqual(&again, rep) {
			t.Fatalf("report %+v encodes as %s, decoding to %+v, %v", rep, b, &again, err)
		}

		var data uint64
		for _, s := range rep.Live {
			data += uint64(s.DataBlocks)
			if s.Problem != "" {
				continue
			}
			if !s.HeaderOK || !s.DataCRCOK || len(s.Metablocks) != s.Count {
				t.Fatalf("live segment %+v without a problem is not sound", s)
			}
			// dump --segment sees the same segment.
			seg, err := Segment(r, *rep.Superblock, s.ID)
			if err != nil {
				t.Fatalf("Segment(%d): %v", s.ID, err)
			}
			seg.Durable = s.Durable
			if !reflect.DeepEqual(seg, s) {
				t.Fatalf("Check reports segment %+v, Segment %+v", s, seg)
			}
		}
		// dump --segment of slots outside the live log (the torn tail, old
		// laps) reports what it finds without failing.
		if sb := rep.Superblock; sb != nil && sb.CacheSize <= uint64(len(e.img)) {
			for _, id := range []uint64{rep.LastID + 1, rep.LastID + 1 + uint64(len(edits))} {
				if id == 0 {
					continue // wrapped around: ids start at 1, and Segment says so
				}
				seg, err := Segment(r, *sb, id)
				if err != nil {
					t.Fatalf("Segment(%d): %v", id, err)
				}
				if seg.HeaderOK && len(seg.Metablocks) != seg.Count {
					t.Fatalf("Segment(%d) = %+v: %d metablocks listed", id, seg, len(seg.Metablocks))
				}
				WriteSegmentText(io.Discard, seg)
			}
		}
		if rep.DirtyBlocks > data {
			t.Fatalf("%d dirty blocks from %d data metablocks", rep.DirtyBlocks, data)
		}
		if rep.Superblock != nil {
			g := rep.Superblock.Geometry()
			if slots := uint64(len(rep.Live)) + uint64(rep.WrittenBackSlots+rep.BlankSlots+rep.OtherSlots); len(rep.Problems) == 0 && rep.Checkpoint != nil && slots > g.NrSegments {
				t.Fatalf("%d slots classified in a ring of %d", slots, g.NrSegments)
			}
		}
	})
}
