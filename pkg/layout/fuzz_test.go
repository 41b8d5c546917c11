package layout

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// The fuzz targets decode arbitrary bytes, which must never panic, and
// re-encode whatever decodes, which must give back the same bytes (as Go's
// archive/tar fuzz test does): a decoder that accepts something its
// encoder would not write is reading a format of its own.
//
// With fix set, the target first recomputes the checksum, so that
// mutations reach the field checks behind it; without, they test the
// checksum itself.

func FuzzDecodeSuperblock(f *testing.F) {
	s, err := NewSuperblock(RingOffset+10*MinSegmentSize, 1<<30, MinSegmentSize, testUUID, 1)
	if err != nil {
		f.Fatal(err)
	}
	good := encodeSuperblock(s)
	f.Add(good, false)
	f.Add(good, true)
	f.Add(make([]byte, BlockSize), false)
	f.Add([]byte("WBOOSTSB"), false)
	for _, off := range []int{3, 8, 12, 40, 44, 56, 64, 72, 100, 4095} {
		b := bytes.Clone(good)
		b[off] ^= 0x10
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, b []byte, fix bool) {
		if fix && len(b) >= BlockSize {
			b = bytes.Clone(b)
			reseal(b)
		}
		s, err := DecodeSuperblock(b)
		if err != nil {
			return
		}
		out := make([]byte, BlockSize)
		s.Encode(out)
		if !bytes.Equal(out, b[:BlockSize]) {
			t.Fatalf("decoded %+v re-encodes differently", s)
		}
		if _, err := NewSuperblock(int64(s.CacheSize), int64(s.BackingSize), int(s.SegmentSize), s.UUID, s.Created); err != nil {
			t.Fatalf("decoded %+v, but NewSuperblock refuses its sizes: %v", s, err)
		}
	})
}

func FuzzDecodeCheckpoint(f *testing.F) {
	good := encodeCheckpoint(testCheckpoint(5))
	clean := testCheckpoint(6)
	clean.Clean = true
	f.Add(good, false)
	f.Add(good, true)
	f.Add(encodeCheckpoint(clean), false)
	f.Add(make([]byte, BlockSize), false)
	f.Add([]byte("WBOOSTCP"), false)
	for _, off := range []int{0, 9, 24, 33, 41, 48, 52, 64, 4093} {
		b := bytes.Clone(good)
		b[off] ^= 0x81
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, b []byte, fix bool) {
		if fix && len(b) >= BlockSize {
			b = bytes.Clone(b)
			reseal(b)
		}
		c, err := DecodeCheckpoint(b)
		if err != nil {
			return
		}
		out := make([]byte, BlockSize)
		c.Encode(out)
		if !bytes.Equal(out, b[:BlockSize]) {
			t.Fatalf("decoded %+v re-encodes differently", c)
		}
		// ChooseCheckpoint must agree when the record is in its slot.
		slots := [2][]byte{make([]byte, BlockSize), make([]byte, BlockSize)}
		slots[c.Slot()] = out
		if got, err := ChooseCheckpoint(slots[0], slots[1], c.UUID); err != nil || got != c {
			t.Fatalf("ChooseCheckpoint of %+v alone: %+v, %v", c, got, err)
		}
	})
}

func FuzzDecodeSegmentHeader(f *testing.F) {
	seg, _ := testSegment(42, testMetablocks, 127)
	good := seg[:BlockSize]
	f.Add(good, uint8(127), false)
	f.Add(good, uint8(3), false)
	f.Add(good, uint8(254), true)
	empty, _ := testSegment(1, nil, 3)
	f.Add(empty[:BlockSize], uint8(3), false)
	f.Add(make([]byte, BlockSize), uint8(127), false)
	f.Add([]byte("WBSG"), uint8(127), false)
	for _, off := range []int{1, 5, 9, 17, 21, 25, 28, 29, 30, 32, 40, 41, 42, 44, 121} {
		b := bytes.Clone(good)
		b[off] ^= 0x42
		f.Add(b, uint8(127), false)
		f.Add(b, uint8(127), true)
	}
	f.Fuzz(func(t *testing.T, b []byte, dataBlocks uint8, fix bool) {
		if fix && len(b) >= BlockSize {
			b = bytes.Clone(b)
			if n := int(binary.LittleEndian.Uint16(b[sgCount:])); n <= MaxMetablocks {
				binary.LittleEndian.PutUint32(b[sgHeaderCRC:], crc(b[sgID:metablockOffset(n)]))
			}
		}
		h, err := DecodeSegmentHeader(b, int(dataBlocks))
		if err != nil {
			return
		}
		if h.Count != len(h.Metablocks) || h.Count > int(dataBlocks) {
			t.Fatalf("count %d, %d metablocks, %d data blocks", h.Count, len(h.Metablocks), dataBlocks)
		}
		out := make([]byte, BlockSize)
		for i, m := range h.Metablocks {
			PutMetablock(out, i, m)
		}
		SealSegmentHeader(out, h.ID, h.Tag, h.Epoch, h.Count, h.DataCRC)
		// The tail after the metablocks is not covered by the checksum
		// and not checked; everything before it must match.
		end := metablockOffset(h.Count)
		if !bytes.Equal(out[:end], b[:end]) {
			t.Fatalf("decoded %+v re-encodes differently", h)
		}
		h2, err := DecodeSegmentHeader(out, int(dataBlocks))
		if err != nil || h2.ID != h.ID || h2.Count != h.Count {
			t.Fatalf("re-encoded header does not decode: %+v, %v", h2, err)
		}
	})
}
