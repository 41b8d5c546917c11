package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"strings"
	"testing"
)

func TestConstants(t *testing.T) {
	// The brief of format v1; these must never change.
	if MaxMetablocks != 254 || MaxSegmentSize != 256*4096 || SegmentHeaderSize != 32 || MetablockSize != 16 ||
		SectorsPerBlock != 8 || RingOffset != 1<<20 || MinSegmentSize != 16<<10 || DefaultSegmentSize != 512<<10 {
		t.Fatal("format constants changed")
	}
	if SegmentHeaderSize+MaxMetablocks*MetablockSize > BlockSize {
		t.Fatal("metablocks do not fit the header block")
	}
	if SuperblockOffsets != [2]int64{0, 4096} || CheckpointOffsets != [2]int64{8192, 12288} {
		t.Fatal("device map changed")
	}
	if (Geometry{SegmentSize: DefaultSegmentSize}).DataBlocks() != 126 {
		t.Fatal("default segment is not 2 header blocks + 126 data blocks")
	}
}

// testSegment builds a segment image (header + data blocks) the way the
// engine does: metablocks placed one by one, then sealed.
func testSegment(id uint64, mbs []Metablock, dataBlocks int) (seg []byte, dataCRC uint32) {
	seg = make([]byte, (1+dataBlocks)*BlockSize)
	hdr := seg[:BlockSize]
	for i := range hdr {
		hdr[i] = 0x77 // stale bytes from an earlier use of the buffer
	}
	for i, m := range mbs {
		PutMetablock(hdr, i, m)
		if m.Kind.HasData() {
			blk := seg[(1+i)*BlockSize : (2+i)*BlockSize]
			for j := range blk {
				blk[j] = byte(i*7 + j)
			}
			dataCRC = UpdateDataCRC(dataCRC, blk)
		}
	}
	SealSegmentHeader(hdr, id, Tag(testUUID), 9, len(mbs), dataCRC)
	return seg, dataCRC
}

var testMetablocks = []Metablock{
	{Block: 5, Mask: 0xFF, Kind: KindData},
	{Block: 1<<40 + 3, Mask: 0x01, Kind: KindData},
	{Block: 0, Length: 1, Kind: KindZero},
	{Block: 77, Mask: 0xFF, Kind: KindClean},
	{Block: math.MaxUint64 - 10, Length: 10, Kind: KindZero},
	{Block: 7, Length: 1 << 20, Kind: KindTrim},
	{Block: math.MaxUint64, Mask: 0x80, Kind: KindData},
}

func TestSegmentRoundTrip(t *testing.T) {
	seg, dataCRC := testSegment(42, testMetablocks, 127)
	hdr := seg[:BlockSize]
	h, err := DecodeSegmentHeader(hdr, 127)
	if err != nil {
		t.Fatal(err)
	}
	if h.ID != 42 || h.Tag != Tag(testUUID) || h.Epoch != 9 || h.DataCRC != dataCRC || h.Count != len(testMetablocks) {
		t.Fatalf("header %+v", h)
	}
	for i, m := range testMetablocks {
		if h.Metablocks[i] != m || GetMetablock(hdr, i) != m {
			t.Fatalf("metablock %d: %+v / %+v, want %+v", i, h.Metablocks[i], GetMetablock(hdr, i), m)
		}
	}
	if !allZero(hdr[SegmentHeaderSize+len(testMetablocks)*MetablockSize:]) {
		t.Fatal("SealSegmentHeader left stale bytes after the metablocks")
	}
	// The data checksum is a plain CRC-32C of the data blocks, concatenated.
	var cat []byte
	for i, m := range testMetablocks {
		if m.Kind.HasData() {
			cat = append(cat, seg[(1+i)*BlockSize:(2+i)*BlockSize]...)
		}
	}
	if want := crc32.Checksum(cat, crc32.MakeTable(crc32.Castagnoli)); dataCRC != want {
		t.Fatalf("data CRC %#x, want %#x", dataCRC, want)
	}
	if DataCRC() != 0 || DataCRC(seg[BlockSize:2*BlockSize], seg[4*BlockSize:5*BlockSize], seg[2*BlockSize:3*BlockSize]) !=
		UpdateDataCRC(UpdateDataCRC(UpdateDataCRC(0, seg[BlockSize:2*BlockSize]), seg[4*BlockSize:5*BlockSize]), seg[2*BlockSize:3*BlockSize]) {
		t.Fatal("DataCRC disagrees with UpdateDataCRC")
	}

	// Empty and full segments.
	for _, n := range []int{0, MaxMetablocks} {
		mbs := make([]Metablock, n)
		for i := range mbs {
			mbs[i] = Metablock{Block: uint64(i), Mask: 0xFF, Kind: KindClean}
		}
		seg, dc := testSegment(1, mbs, MaxMetablocks)
		h, err := DecodeSegmentHeader(seg[:BlockSize], MaxMetablocks)
		if err != nil || h.Count != n || len(h.Metablocks) != n || h.DataCRC != dc {
			t.Fatalf("%d metablocks: %+v, %v", n, h, err)
		}
		if n == 0 && dc != 0 {
			t.Fatal("CRC of no blocks is not 0")
		}
	}
}

func TestSegmentHeaderOffsets(t *testing.T) {
	hdr := make([]byte, BlockSize)
	PutMetablock(hdr, 0, Metablock{Block: 0x0102030405060708, Mask: 0x0f, Kind: KindData})
	PutMetablock(hdr, 1, Metablock{Block: 0x99, Kind: KindZero, Length: 0x11223344})
	SealSegmentHeader(hdr, 0xA1A2A3A4A5A6A7A8, 0xB1B2B3B4, 0xC1C2C3C4, 2, 0xD1D2D3D4)
	le := binary.LittleEndian
	switch {
	case string(hdr[:4]) != "WBSG":
		t.Errorf("magic %q", hdr[:4])
	case le.Uint32(hdr[4:]) != crc(hdr[8:64]):
		t.Error("header CRC does not cover [8, 32+16*count)")
	case le.Uint64(hdr[8:]) != 0xA1A2A3A4A5A6A7A8, le.Uint32(hdr[16:]) != 0xB1B2B3B4, le.Uint32(hdr[20:]) != 0xC1C2C3C4:
		t.Errorf("id/tag/epoch: % x", hdr[8:24])
	case le.Uint32(hdr[24:]) != 0xD1D2D3D4, le.Uint16(hdr[28:]) != 2, le.Uint16(hdr[30:]) != 0:
		t.Errorf("data crc/count/flags: % x", hdr[24:32])
	case le.Uint64(hdr[32:]) != 0x0102030405060708, hdr[40] != 0x0f, hdr[41] != 1, hdr[42] != 0, hdr[43] != 0, le.Uint32(hdr[44:]) != 0:
		t.Errorf("metablock 0: % x", hdr[32:48])
	case le.Uint64(hdr[48:]) != 0x99, hdr[56] != 0, hdr[57] != 3, le.Uint32(hdr[60:]) != 0x11223344:
		t.Errorf("metablock 1: % x", hdr[48:64])
	}
	if Tag(testUUID) != 0x43322110 {
		t.Errorf("Tag = %#x, want the first 4 UUID bytes little-endian", Tag(testUUID))
	}
}

func TestDecodeSegmentHeaderErrors(t *testing.T) {
	seg, _ := testSegment(42, testMetablocks, 127)
	good := seg[:BlockSize]
	le := binary.LittleEndian
	n := len(testMetablocks)
	// setMeta rewrites metablock i and reseals the header.
	setMeta := func(i int, m Metablock) func([]byte) []byte {
		return func(b []byte) []byte {
			PutMetablock(b, i, m)
			SealSegmentHeader(b, 42, 1, 1, n, 0)
			return b
		}
	}
	resealSeg := func(b []byte) { le.PutUint32(b[4:], crc(b[8:SegmentHeaderSize+n*MetablockSize])) }
	for _, tc := range []struct {
		name       string
		edit       func(b []byte) []byte
		dataBlocks int
		want       error
		msg        string
	}{
		{"short", func(b []byte) []byte { return b[:SegmentHeaderSize+n*MetablockSize] }, 127, ErrInvalid, "need 4096"},
		{"never written", func(b []byte) []byte { return make([]byte, BlockSize) }, 127, ErrBlank, ""},
		{"old data in the slot", func(b []byte) []byte { return bytes.Repeat([]byte{1, 2, 3, 4}, BlockSize/4) }, 127, ErrBadMagic, "WBSG"},
		{"zero magic", func(b []byte) []byte { clear(b[:4]); return b }, 127, ErrBadMagic, ""},
		{"id flip", func(b []byte) []byte { b[9] ^= 1; return b }, 127, ErrChecksum, ""},
		{"metablock flip", func(b []byte) []byte { b[SegmentHeaderSize+n*MetablockSize-1] ^= 1; return b }, 127, ErrChecksum, ""},
		{"count flip", func(b []byte) []byte { b[28]--; return b }, 127, ErrChecksum, ""},
		{"torn metablocks", func(b []byte) []byte { clear(b[SegmentHeaderSize+MetablockSize:]); return b }, 127, ErrChecksum, ""},
		{"count above max", func(b []byte) []byte { le.PutUint16(b[28:], MaxMetablocks+1); return b }, 127, ErrInvalid, "at most 254"},
		{"count above max, huge", func(b []byte) []byte { le.PutUint16(b[28:], 0xFFFF); return b }, 127, ErrInvalid, ""},
		{"more metablocks than data blocks", func(b []byte) []byte { return b }, n - 1, ErrInvalid, "data blocks"},
		{"negative data blocks", func(b []byte) []byte { return b }, -1, ErrInvalid, "data blocks"},
		{"flags", func(b []byte) []byte { b[30] = 1; resealSeg(b); return b }, 127, ErrInvalid, "flags"},
		{"id 0", func(b []byte) []byte { SealSegmentHeader(b, 0, 1, 1, n, 0); return b }, 127, ErrInvalid, "id 0"},
		{"data without mask", setMeta(1, Metablock{Block: 1, Kind: KindData}), 127, ErrInvalid, "metablock 1"},
		{"data with length", setMeta(0, Metablock{Block: 1, Mask: 1, Length: 1, Kind: KindData}), 127, ErrInvalid, "metablock 0"},
		{"partial clean", setMeta(3, Metablock{Block: 1, Mask: 0x7F, Kind: KindClean}), 127, ErrInvalid, "clean"},
		{"clean with length", setMeta(3, Metablock{Block: 1, Mask: 0xFF, Length: 2, Kind: KindClean}), 127, ErrInvalid, "clean"},
		{"discard with mask", setMeta(2, Metablock{Block: 1, Mask: 1, Length: 1, Kind: KindZero}), 127, ErrInvalid, "zero"},
		{"empty discard", setMeta(2, Metablock{Block: 1, Kind: KindZero}), 127, ErrInvalid, "zero"},
		{"discard past 2^64", setMeta(4, Metablock{Block: math.MaxUint64 - 9, Length: 10, Kind: KindZero}), 127, ErrInvalid, "overflow"},
		{"empty trim", setMeta(2, Metablock{Block: 1, Kind: KindTrim}), 127, ErrInvalid, "trim"},
		{"trim with mask", setMeta(2, Metablock{Block: 1, Mask: 0xff, Length: 1, Kind: KindTrim}), 127, ErrInvalid, "trim"},
		{"unknown kind 5", setMeta(2, Metablock{Block: 1, Length: 1, Kind: 5}), 127, ErrInvalid, "kind(5)"},
		{"kind 0", setMeta(5, Metablock{Block: 1, Mask: 1}), 127, ErrInvalid, "kind(0)"},
		{"kind 5", setMeta(5, Metablock{Block: 1, Mask: 1, Kind: 5}), 127, ErrInvalid, "kind(5)"},
		{"metablock reserved", func(b []byte) []byte { b[SegmentHeaderSize+10] = 1; resealSeg(b); return b }, 127, ErrInvalid, "reserved"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeSegmentHeader(tc.edit(bytes.Clone(good)), tc.dataBlocks)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
		})
	}

	// Bytes past the used metablocks are outside the checksum: a header
	// block whose tail is stale (a torn write of the header block whose
	// used part made it) still decodes.
	b := bytes.Clone(good)
	for i := SegmentHeaderSize + n*MetablockSize; i < BlockSize; i++ {
		b[i] = 0xEE
	}
	if h, err := DecodeSegmentHeader(b, 127); err != nil || h.Count != n {
		t.Fatalf("stale tail: %+v, %v", h, err)
	}
}

func TestMetablockIndexPanics(t *testing.T) {
	for _, i := range []int{-1, MaxMetablocks} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("PutMetablock(%d) did not panic", i)
				}
			}()
			PutMetablock(make([]byte, BlockSize), i, Metablock{})
		}()
	}
}

func TestKind(t *testing.T) {
	for k, want := range map[Kind]bool{0: false, KindData: true, KindClean: true, KindZero: false, KindTrim: false, 5: false} {
		if k.HasData() != want {
			t.Errorf("%v.HasData() = %v", k, !want)
		}
	}
	if KindData != 1 || KindClean != 2 || KindZero != 3 || KindTrim != 4 {
		t.Fatal("kind numbers are part of the format")
	}
}

func TestGeometry(t *testing.T) {
	g := Geometry{SegmentSize: 64 << 10, NrSegments: 3}
	if g.DataBlocks() != 14 {
		t.Fatalf("DataBlocks = %d", g.DataBlocks())
	}
	for _, tc := range []struct {
		id   uint64
		slot uint64
	}{{1, 0}, {2, 1}, {3, 2}, {4, 0}, {5, 1}, {3000, 2}, {math.MaxUint64, (math.MaxUint64 - 1) % 3}} {
		if got := g.SlotOf(tc.id); got != tc.slot {
			t.Errorf("SlotOf(%d) = %d, want %d", tc.id, got, tc.slot)
		}
		off := RingOffset + int64(tc.slot)*(64<<10)
		if got := g.SegmentOffset(tc.id); got != off {
			t.Errorf("SegmentOffset(%d) = %d, want %d", tc.id, got, off)
		}
		if got := g.DataBlockOffset(tc.id, 13); got != off+14*4096 {
			t.Errorf("DataBlockOffset(%d, 13) = %d", tc.id, got)
		}
		if got := g.HeaderOffset(tc.id, 0); got != off {
			t.Errorf("HeaderOffset(%d, 0) = %d, want %d", tc.id, got, off)
		}
		// Copy 1 is the slot's last block, right after the last data block.
		if got := g.HeaderOffset(tc.id, 1); got != off+15*4096 || got != g.DataBlockOffset(tc.id, 13)+BlockSize {
			t.Errorf("HeaderOffset(%d, 1) = %d, want %d", tc.id, got, off+15*4096)
		}
	}
	// The last byte of the ring stays inside the size the superblock checks.
	s := testSuperblock(t)
	sg := s.Geometry()
	last := sg.HeaderOffset(s.NrSegments, 1) + BlockSize
	if last != RingOffset+int64(s.NrSegments)*int64(s.SegmentSize) || uint64(last) > s.CacheSize {
		t.Fatalf("ring ends at %d, cache size %d", last, s.CacheSize)
	}
}

func TestSegmentCandidates(t *testing.T) {
	const id, tag = 42, 0x11223344
	hdr := func(id uint64, tag, epoch uint32, count int) []byte {
		b := make([]byte, BlockSize)
		for i := 0; i < count; i++ {
			PutMetablock(b, i, Metablock{Block: uint64(i), Mask: 0xff, Kind: KindData})
		}
		SealSegmentHeader(b, id, tag, epoch, count, 0)
		return b
	}
	torn := hdr(id, tag, 3, 9)
	torn[SegmentHeaderSize+3] ^= 1
	for _, tc := range []struct {
		name   string
		c0, c1 []byte
		want   []int // copies, best first
	}{
		{"both blank", make([]byte, BlockSize), make([]byte, BlockSize), nil},
		{"only copy 0", hdr(id, tag, 3, 5), make([]byte, BlockSize), []int{0}},
		{"only copy 1", nil, hdr(id, tag, 3, 5), []int{1}},
		{"same run: more metablocks wins", hdr(id, tag, 3, 5), hdr(id, tag, 3, 9), []int{1, 0}},
		{"same run: more metablocks wins, copy 0", hdr(id, tag, 3, 9), hdr(id, tag, 3, 5), []int{0, 1}},
		{"newer run wins over more metablocks", hdr(id, tag, 2, 100), hdr(id, tag, 3, 1), []int{1, 0}},
		{"previous lap of the ring", hdr(id, tag, 3, 5), hdr(id-7, tag, 3, 9), []int{0}},
		{"another cache", hdr(id, tag+1, 3, 5), hdr(id, tag, 3, 2), []int{1}},
		{"torn copy", hdr(id, tag, 3, 5), torn, []int{0}},
	} {
		got := SegmentCandidates(tc.c0, tc.c1, id, tag, 126)
		var copies []int
		for _, h := range got {
			if h.ID != id || h.Tag != tag {
				t.Errorf("%s: candidate of segment %d tag %#x", tc.name, h.ID, h.Tag)
			}
			copies = append(copies, h.Copy)
		}
		if fmt.Sprint(copies) != fmt.Sprint(tc.want) {
			t.Errorf("%s: copies %v, want %v", tc.name, copies, tc.want)
		}
	}
}
