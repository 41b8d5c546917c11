package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func encodeCheckpoint(c Checkpoint) []byte {
	b := make([]byte, BlockSize)
	c.Encode(b)
	return b
}

func testCheckpoint(seq uint64) Checkpoint {
	return Checkpoint{UUID: testUUID, Seq: seq, LastWritebackID: 10 * seq, LastFlushedID: 10*seq + 5, Epoch: uint32(seq), Time: int64(seq) * 1e9}
}

func TestCheckpointRoundTrip(t *testing.T) {
	for _, c := range []Checkpoint{
		testCheckpoint(1),
		{UUID: testUUID, Seq: 1<<64 - 1, LastWritebackID: 7, LastFlushedID: 7, Clean: true, Epoch: 1<<32 - 1, Time: -1},
		{UUID: testUUID, Seq: 2},
		// Written back (and the backing flushed) before the cache flush that made it durable there.
		{UUID: testUUID, Seq: 3, LastWritebackID: 8, LastFlushedID: 2},
	} {
		b := make([]byte, BlockSize)
		for i := range b {
			b[i] = 0x55
		}
		c.Encode(b)
		got, err := DecodeCheckpoint(b)
		if err != nil || got != c {
			t.Fatalf("round trip of %+v: %+v, %v", c, got, err)
		}
		if c.Slot() != int(c.Seq%2) {
			t.Fatalf("Slot = %d for seq %d", c.Slot(), c.Seq)
		}
	}
}

func TestCheckpointOffsets(t *testing.T) {
	c := Checkpoint{UUID: testUUID, Seq: 0x0102030405060708, LastWritebackID: 0x1112, LastFlushedID: 0x2122, Clean: true, Epoch: 0x31323334, Time: 0x4142}
	b := encodeCheckpoint(c)
	le := binary.LittleEndian
	switch {
	case string(b[:8]) != "WBOOSTCP":
		t.Errorf("magic %q", b[:8])
	case !bytes.Equal(b[8:24], testUUID[:]):
		t.Errorf("uuid %x", b[8:24])
	case le.Uint64(b[24:]) != c.Seq, le.Uint64(b[32:]) != 0x1112, le.Uint64(b[40:]) != 0x2122:
		t.Errorf("ids: % x", b[24:48])
	case le.Uint32(b[48:]) != 1, le.Uint32(b[52:]) != 0x31323334, le.Uint64(b[56:]) != 0x4142:
		t.Errorf("flags/epoch/time: % x", b[48:64])
	case !allZero(b[64:4092]):
		t.Error("reserved bytes not zero")
	case le.Uint32(b[4092:]) != crc(b[:4092]):
		t.Error("checksum")
	}
}

func TestDecodeCheckpointErrors(t *testing.T) {
	good := encodeCheckpoint(testCheckpoint(3))
	le := binary.LittleEndian
	for _, tc := range []struct {
		name string
		edit func(b []byte) []byte
		want error
		msg  string
	}{
		{"short", func(b []byte) []byte { return b[:100] }, ErrInvalid, "need 4096"},
		{"blank", func(b []byte) []byte { return make([]byte, BlockSize) }, ErrBlank, ""},
		{"superblock in a checkpoint slot", func(b []byte) []byte { s := testSuperblock(t); return encodeSuperblock(s) }, ErrBadMagic, "WBOOSTCP"},
		{"bit flip", func(b []byte) []byte { b[33] ^= 0x80; return b }, ErrChecksum, ""},
		{"torn", func(b []byte) []byte { clear(b[BlockSize-SectorSize:]); return b }, ErrChecksum, ""},
		{"flags", func(b []byte) []byte { b[48] |= 2; reseal(b); return b }, ErrInvalid, "flags"},
		{"reserved", func(b []byte) []byte { b[64] = 1; reseal(b); return b }, ErrInvalid, "reserved"},
		{"seq 0", func(b []byte) []byte { le.PutUint64(b[24:], 0); reseal(b); return b }, ErrInvalid, "sequence 0"},
		{"clean, writeback after the end of the log", func(b []byte) []byte { le.PutUint64(b[32:], 36); b[48] |= 1; reseal(b); return b }, ErrInvalid, "clean shutdown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeCheckpoint(tc.edit(bytes.Clone(good)))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
		})
	}
}

func TestChooseCheckpoint(t *testing.T) {
	c1, c2, c3 := testCheckpoint(1), testCheckpoint(2), testCheckpoint(3)
	b1, b2, b3 := encodeCheckpoint(c1), encodeCheckpoint(c2), encodeCheckpoint(c3)
	blank := make([]byte, BlockSize)
	torn := func(b []byte) []byte { b = bytes.Clone(b); clear(b[SectorSize:]); return b }
	tornHead := func(b []byte) []byte { b = bytes.Clone(b); clear(b[:SectorSize]); return b }
	otherUUID := testUUID
	otherUUID[15]++
	foreignOf := func(c Checkpoint) []byte { c.UUID = otherUUID; return encodeCheckpoint(c) }
	garbage := bytes.Repeat([]byte{0xde, 0xad}, BlockSize/2)
	fresh := Checkpoint{UUID: testUUID}

	for _, tc := range []struct {
		name string
		a, b []byte // slot 0, slot 1
		want Checkpoint
		err  error
	}{
		{"fresh cache", blank, blank, fresh, nil},
		{"first record", blank, b1, c1, nil},
		{"first record torn", blank, torn(b1), fresh, nil},
		{"first record torn in its first sector", blank, tornHead(b1), fresh, nil},
		{"second record", b2, b1, c2, nil},
		{"second torn", torn(b2), b1, c1, nil},
		{"third", b2, b3, c3, nil},
		{"third torn", b2, torn(b3), c2, nil},
		{"third torn in its first sector", b2, tornHead(b3), c2, nil},
		{"other cache's record next to ours", foreignOf(c3), b3, c3, nil},
		{"record in the wrong slot is ignored", b3, b2, Checkpoint{}, ErrInvalid},
		{"record in the wrong slot next to a good one", b1, b1, c1, nil},
		{"only another cache's records", foreignOf(c2), foreignOf(c1), Checkpoint{}, ErrForeignUUID},
		{"another cache's record and blank", blank, foreignOf(c1), Checkpoint{}, ErrForeignUUID},
		{"another cache's record and a torn one", foreignOf(c2), torn(b1), Checkpoint{}, ErrChecksum},
		{"slot 0 torn, slot 1 blank", torn(b2), blank, Checkpoint{}, ErrChecksum},
		{"both torn", torn(b2), torn(b1), Checkpoint{}, ErrChecksum},
		{"garbage in both", garbage, garbage, Checkpoint{}, ErrBadMagic},
		{"garbage and blank", garbage, blank, Checkpoint{}, ErrBadMagic},
		{"short", nil, nil, Checkpoint{}, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ChooseCheckpoint(tc.a, tc.b, testUUID)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// TestCheckpointSequenceTornSweep writes records 1..6 to their slots
// as the engine does, tearing each write at every sector subset: the
// choice is always the record just written or the one before it.
func TestCheckpointSequenceTornSweep(t *testing.T) {
	slots := [2][]byte{make([]byte, BlockSize), make([]byte, BlockSize)}
	prev := Checkpoint{UUID: testUUID}
	for seq := uint64(1); seq <= 6; seq++ {
		c := testCheckpoint(seq)
		nb := encodeCheckpoint(c)
		for keep := 0; keep < 1<<SectorsPerBlock; keep++ {
			s := [2][]byte{bytes.Clone(slots[0]), bytes.Clone(slots[1])}
			for i := 0; i < SectorsPerBlock; i++ {
				if keep&(1<<i) != 0 {
					copy(s[seq%2][i*SectorSize:(i+1)*SectorSize], nb[i*SectorSize:])
				}
			}
			got, err := ChooseCheckpoint(s[0], s[1], testUUID)
			if err != nil {
				t.Fatalf("seq %d keep %08b: %v", seq, keep, err)
			}
			if got != c && got != prev {
				t.Fatalf("seq %d keep %08b: got %+v, want record %d or %d", seq, keep, got, seq, prev.Seq)
			}
			if keep == 1<<SectorsPerBlock-1 && got != c {
				t.Fatalf("seq %d: complete write not chosen: %+v", seq, got)
			}
		}
		copy(slots[seq%2], nb)
		prev = c
	}
}
