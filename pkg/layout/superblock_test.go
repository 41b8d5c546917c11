package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

var testUUID = [16]byte{0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87, 0x98, 0xa9, 0xba, 0xcb, 0xdc, 0xed, 0xfe, 0x0f}

func testSuperblock(t testing.TB) Superblock {
	t.Helper()
	s, err := NewSuperblock(RingOffset+100*DefaultSegmentSize+12345, 10<<30, DefaultSegmentSize, testUUID, 1700000000123456789)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func encodeSuperblock(s Superblock) []byte {
	b := make([]byte, BlockSize)
	s.Encode(b)
	return b
}

// reseal recomputes the checksum of a block-sized record after a test
// has edited a field, so the edit reaches field validation.
func reseal(b []byte) {
	binary.LittleEndian.PutUint32(b[blockCRC:], crc(b[:blockCRC]))
}

func TestNewSuperblock(t *testing.T) {
	s := testSuperblock(t)
	want := Superblock{Version: Version, UUID: testUUID, Seq: 1, BlockSize: BlockSize, SegmentSize: DefaultSegmentSize,
		CacheSize: RingOffset + 100*DefaultSegmentSize + 12345, BackingSize: 10 << 30, RingOffset: RingOffset,
		NrSegments: 100, Created: 1700000000123456789}
	if s != want {
		t.Fatalf("NewSuperblock = %+v, want %+v", s, want)
	}
	if g := s.Geometry(); g != (Geometry{SegmentSize: DefaultSegmentSize, NrSegments: 100}) {
		t.Fatalf("Geometry = %+v", g)
	}
}

func TestNewSuperblockErrors(t *testing.T) {
	for _, tc := range []struct {
		name           string
		cache, backing int64
		seg            int
		wantInMessage  string
	}{
		{"segment too small", 1 << 30, 1 << 30, MinSegmentSize - BlockSize, "segment size"},
		{"segment too large", 1 << 30, 1 << 30, MaxSegmentSize + BlockSize, "segment size"},
		{"segment unaligned", 1 << 30, 1 << 30, DefaultSegmentSize + 512, "segment size"},
		{"backing zero", 1 << 30, 0, DefaultSegmentSize, "backing size"},
		{"backing unaligned", 1 << 30, 1<<30 + 512, DefaultSegmentSize, "backing size"},
		{"backing negative", 1 << 30, -4096, DefaultSegmentSize, "backing size"},
		{"one segment only", RingOffset + 2*DefaultSegmentSize - 1, 1 << 30, DefaultSegmentSize, "too small"},
		{"no ring at all", RingOffset / 2, 1 << 30, DefaultSegmentSize, "too small"},
		{"negative cache", -1, 1 << 30, DefaultSegmentSize, "too small"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewSuperblock(tc.cache, tc.backing, tc.seg, testUUID, 0)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.wantInMessage) {
				t.Fatalf("err = %v, want ErrInvalid mentioning %q", err, tc.wantInMessage)
			}
		})
	}
	// The smallest valid cache: exactly two segments.
	s, err := NewSuperblock(RingOffset+2*MinSegmentSize, BlockSize, MinSegmentSize, testUUID, 0)
	if err != nil || s.NrSegments != 2 {
		t.Fatalf("minimal cache: %+v, %v", s, err)
	}
}

func TestSuperblockRoundTrip(t *testing.T) {
	s := testSuperblock(t)
	s.Seq = 1<<64 - 1
	s.Created = -5
	b := make([]byte, BlockSize+100)
	for i := range b {
		b[i] = 0xAA // Encode must clear the reserved bytes, and stop at BlockSize
	}
	s.Encode(b)
	if b[BlockSize] != 0xAA {
		t.Fatal("Encode wrote past BlockSize")
	}
	got, err := DecodeSuperblock(b)
	if err != nil {
		t.Fatal(err)
	}
	if got != s {
		t.Fatalf("round trip: got %+v, want %+v", got, s)
	}
	// A zero Version encodes as the current one.
	s.Version = 0
	got, err = DecodeSuperblock(encodeSuperblock(s))
	if err != nil || got.Version != Version {
		t.Fatalf("zero version: %+v, %v", got, err)
	}
}

// TestSuperblockOffsets pins every field to the offset the package doc
// gives it: the format must not move by accident.
func TestSuperblockOffsets(t *testing.T) {
	s := testSuperblock(t)
	s.Seq = 0x0102030405060708
	b := encodeSuperblock(s)
	le := binary.LittleEndian
	if string(b[0:8]) != "WBOOSTSB" {
		t.Errorf("magic %q", b[0:8])
	}
	for _, f := range []struct {
		off, size int
		want      uint64
	}{
		{8, 4, Version}, {12, 4, 0}, {32, 8, s.Seq}, {40, 4, 4096}, {44, 4, DefaultSegmentSize},
		{48, 8, s.CacheSize}, {56, 8, 10 << 30}, {64, 8, 1 << 20}, {72, 8, 100}, {80, 8, uint64(s.Created)},
		{4092, 4, uint64(crc(b[:4092]))},
	} {
		var got uint64
		if f.size == 4 {
			got = uint64(le.Uint32(b[f.off:]))
		} else {
			got = le.Uint64(b[f.off:])
		}
		if got != f.want {
			t.Errorf("offset %d: %#x, want %#x", f.off, got, f.want)
		}
	}
	if !bytes.Equal(b[16:32], testUUID[:]) {
		t.Errorf("uuid %x", b[16:32])
	}
	if !allZero(b[88:4092]) {
		t.Error("reserved bytes not zero")
	}
}

func TestDecodeSuperblockErrors(t *testing.T) {
	good := encodeSuperblock(testSuperblock(t))
	le := binary.LittleEndian
	for _, tc := range []struct {
		name string
		edit func(b []byte) []byte
		want error
		msg  string
	}{
		{"empty", func(b []byte) []byte { return nil }, ErrInvalid, "need 4096"},
		{"short", func(b []byte) []byte { return b[:BlockSize-1] }, ErrInvalid, "need 4096"},
		{"blank", func(b []byte) []byte { return make([]byte, BlockSize) }, ErrBlank, ""},
		{"foreign data", func(b []byte) []byte { return bytes.Repeat([]byte("ext4"), BlockSize/4) }, ErrBadMagic, "WBOOSTSB"},
		{"foreign, first bytes zero", func(b []byte) []byte { c := make([]byte, BlockSize); c[1000] = 1; return c }, ErrBadMagic, ""},
		{"magic damaged", func(b []byte) []byte { b[3] ^= 1; return b }, ErrBadMagic, ""},
		{"bit flip", func(b []byte) []byte { b[50] ^= 4; return b }, ErrChecksum, ""},
		{"checksum flip", func(b []byte) []byte { b[4093] ^= 1; return b }, ErrChecksum, ""},
		{"reserved flip", func(b []byte) []byte { b[2000] ^= 1; return b }, ErrChecksum, ""},
		{"newer version", func(b []byte) []byte { le.PutUint32(b[8:], 3); reseal(b); return b }, ErrNewerVersion, "version 3, written by a newer writeboost"},
		// A newer version may change any field; the version is reported before them.
		{"newer version, other fields", func(b []byte) []byte {
			le.PutUint32(b[8:], 7)
			b[100] = 1
			le.PutUint32(b[40:], 8192)
			reseal(b)
			return b
		}, ErrNewerVersion, "version 7"},
		{"older version", func(b []byte) []byte { le.PutUint32(b[8:], 0); reseal(b); return b }, ErrOlderVersion, "version 0"},
		{"flags", func(b []byte) []byte { le.PutUint32(b[12:], 4); reseal(b); return b }, ErrInvalid, "flags"},
		{"reserved", func(b []byte) []byte { b[88] = 1; reseal(b); return b }, ErrInvalid, "reserved"},
		{"reserved end", func(b []byte) []byte { b[4091] = 1; reseal(b); return b }, ErrInvalid, "reserved"},
		{"block size", func(b []byte) []byte { le.PutUint32(b[40:], 512); reseal(b); return b }, ErrInvalid, "block size"},
		{"segment small", func(b []byte) []byte { le.PutUint32(b[44:], 8192); reseal(b); return b }, ErrInvalid, "segment size"},
		{"segment large", func(b []byte) []byte { le.PutUint32(b[44:], MaxSegmentSize+4096); reseal(b); return b }, ErrInvalid, "segment size"},
		{"segment unaligned", func(b []byte) []byte { le.PutUint32(b[44:], DefaultSegmentSize+1); reseal(b); return b }, ErrInvalid, "segment size"},
		{"ring offset", func(b []byte) []byte { le.PutUint64(b[64:], 2<<20); reseal(b); return b }, ErrInvalid, "ring offset"},
		{"no segments", func(b []byte) []byte { le.PutUint64(b[72:], 0); reseal(b); return b }, ErrInvalid, "segments"},
		{"one segment", func(b []byte) []byte { le.PutUint64(b[72:], 1); reseal(b); return b }, ErrInvalid, "segments"},
		{"ring too big", func(b []byte) []byte { le.PutUint64(b[72:], 101); reseal(b); return b }, ErrInvalid, "does not fit"},
		{"ring overflows", func(b []byte) []byte { le.PutUint64(b[72:], 1<<63); reseal(b); return b }, ErrInvalid, "does not fit"},
		{"cache below ring", func(b []byte) []byte { le.PutUint64(b[48:], 4096); reseal(b); return b }, ErrInvalid, "does not fit"},
		{"cache size huge", func(b []byte) []byte { le.PutUint64(b[48:], 1<<64-1); reseal(b); return b }, ErrInvalid, "out of range"},
		{"backing huge", func(b []byte) []byte { le.PutUint64(b[56:], 1<<63); reseal(b); return b }, ErrInvalid, "out of range"},
		{"backing zero", func(b []byte) []byte { le.PutUint64(b[56:], 0); reseal(b); return b }, ErrInvalid, "backing size"},
		{"backing unaligned", func(b []byte) []byte { le.PutUint64(b[56:], 1<<30+512); reseal(b); return b }, ErrInvalid, "backing size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.edit(bytes.Clone(good))
			_, err := DecodeSuperblock(b)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %q, want it to mention %q", err, tc.msg)
			}
		})
	}
	// A longer input is decoded from its first block.
	if _, err := DecodeSuperblock(append(bytes.Clone(good), 1, 2, 3)); err != nil {
		t.Fatalf("long input: %v", err)
	}
}

func TestChooseSuperblock(t *testing.T) {
	old := testSuperblock(t)
	nw := old
	nw.Seq = 2
	nw.BackingSize *= 2
	ob, nb := encodeSuperblock(old), encodeSuperblock(nw)
	torn := bytes.Clone(nb)
	copy(torn[:SectorSize], ob[:SectorSize]) // first sector old, rest new
	blank := make([]byte, BlockSize)
	foreign := bytes.Repeat([]byte{0xEB, 0x3C, 0x90}, BlockSize/3+1)[:BlockSize]
	newer := bytes.Clone(nb)
	binary.LittleEndian.PutUint32(newer[8:], Version+1)
	reseal(newer)

	for _, tc := range []struct {
		name string
		a, b []byte
		want Superblock
		err  error
	}{
		{"both valid, a newer", nb, ob, nw, nil},
		{"both valid, b newer", ob, nb, nw, nil},
		{"same", ob, ob, old, nil},
		{"a torn", torn, ob, old, nil},
		{"b torn", nb, torn, nw, nil},
		{"a blank", blank, nb, nw, nil},
		{"b blank", ob, blank, old, nil},
		{"a foreign", foreign, ob, old, nil},
		{"both blank", blank, blank, Superblock{}, ErrBlank},
		{"both foreign", foreign, foreign, Superblock{}, ErrBadMagic},
		{"blank and foreign", blank, foreign, Superblock{}, ErrBadMagic},
		{"blank and torn", blank, torn, Superblock{}, ErrChecksum},
		{"foreign and torn", torn, foreign, Superblock{}, ErrChecksum},
		{"both torn", torn, torn, Superblock{}, ErrChecksum},
		{"newer and torn", torn, newer, Superblock{}, ErrNewerVersion},
		{"newer and blank", newer, blank, Superblock{}, ErrNewerVersion},
		{"short", nil, nil, Superblock{}, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ChooseSuperblock(tc.a, tc.b)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				// The error is the chosen sentinel only: callers branch on it.
				for _, other := range []error{ErrBlank, ErrBadMagic, ErrChecksum, ErrNewerVersion, ErrInvalid} {
					if other != tc.err && errors.Is(err, other) {
						t.Fatalf("err = %v also matches %v", err, other)
					}
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}

	t.Run("different caches", func(t *testing.T) {
		other := nw
		other.UUID[0]++
		_, err := ChooseSuperblock(ob, encodeSuperblock(other))
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "different caches") {
			t.Fatalf("err = %v", err)
		}
	})
}

// TestSuperblockTornWriteSweep rewrites copy a over an older version of
// itself, keeping every subset of the new sectors (a torn write), with
// copy b intact at either the old or the new version, as the engine's
// write order (b, flush, a) allows. The superblock is never lost, and
// what comes back is the old or the new one.
func TestSuperblockTornWriteSweep(t *testing.T) {
	old := testSuperblock(t)
	nw := old
	nw.Seq++
	nw.BackingSize += BlockSize
	ob, nb := encodeSuperblock(old), encodeSuperblock(nw)
	for _, other := range [][]byte{ob, nb} {
		for keep := 0; keep < 1<<SectorsPerBlock; keep++ {
			a := bytes.Clone(ob)
			for s := 0; s < SectorsPerBlock; s++ {
				if keep&(1<<s) != 0 {
					copy(a[s*SectorSize:(s+1)*SectorSize], nb[s*SectorSize:])
				}
			}
			got, err := ChooseSuperblock(a, other)
			if err != nil {
				t.Fatalf("keep %08b: %v", keep, err)
			}
			if got != old && got != nw {
				t.Fatalf("keep %08b: got %+v", keep, got)
			}
			if bytes.Equal(other, nb) && got != nw {
				t.Fatalf("keep %08b: the durable new copy lost to an older one", keep)
			}
		}
	}
}
