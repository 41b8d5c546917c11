package inspect

import (
	"bytes"
	"math/rand"
	"strings"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// buildCache writes a few segments' worth of data through the engine and
// closes it cleanly (or abandons it after a flush) and returns the cache.
func buildCache(t *testing.T, clean bool) *blockdev.Mem {
	t.Helper()
	cache := blockdev.NewMem(16<<20, nil)
	backing := blockdev.NewMem(64<<20, nil)
	tun := engine.DefaultTunables()
	tun.WritebackThreshold = 0 // keep everything in the log
	e, err := engine.Open(engine.Options{Cache: cache, Backing: backing, Format: true,
		SegmentSize: 64 << 10, Tunables: tun})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(1))
	buf := make([]byte, 4096)
	for i := 0; i < 100; i++ {
		r.Read(buf)
		if _, err := e.WriteAt(buf, int64(i*2)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.WriteAt(buf, 0); err != nil { // an overwrite: still 100 distinct dirty blocks
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if clean {
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return cache
}

func TestCheckHealthyCache(t *testing.T) {
	for _, clean := range []bool{true, false} {
		cache := buildCache(t, clean)
		var calls int
		rep, err := Check(cache, cache.Size(), Options{Progress: func(done, total uint64) { calls++ }})
		if err != nil {
			t.Fatal(err)
		}
		if rep.Corrupt() {
			t.Fatalf("clean=%v: healthy cache reported corrupt: %v", clean, rep.Problems)
		}
		if rep.DirtyBlocks != 100 {
			t.Errorf("clean=%v: dirty blocks = %d, want 100", clean, rep.DirtyBlocks)
		}
		if len(rep.Live) < 7 || rep.LastID != rep.Live[len(rep.Live)-1].ID {
			t.Errorf("clean=%v: %d live segments, last id %d", clean, len(rep.Live), rep.LastID)
		}
		if rep.Checkpoint.Clean != clean {
			t.Errorf("checkpoint clean = %v, want %v", rep.Checkpoint.Clean, clean)
		}
		if calls == 0 {
			t.Error("no progress reported")
		}
		var out bytes.Buffer
		rep.WriteText(&out)
		if !strings.Contains(out.String(), "result: OK") || !strings.Contains(out.String(), "100 dirty blocks") {
			t.Errorf("text report:\n%s", out.String())
		}
	}
}

func TestCheckFindsCorruptSegment(t *testing.T) {
	cache := buildCache(t, true)
	rep, err := Check(cache, cache.Size(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	victim := rep.Live[2]
	// Flip one byte in the victim's third data block.
	off := victim.Offset + 3*layout.BlockSize + 100
	flipByte(t, cache, off)

	rep, err = Check(cache, cache.Size(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Corrupt() {
		t.Fatal("a flipped data byte went unnoticed")
	}
	want := "segment " + itoa(victim.ID) + " "
	if !strings.Contains(rep.Problems[0], want) || !strings.Contains(rep.Problems[0], "data checksum") {
		t.Fatalf("problem %q does not name %q and the data checksum", rep.Problems[0], want)
	}

	// dump --segment shows the same segment as damaged, with its metablocks.
	seg, err := Segment(cache, *rep.Superblock, victim.ID)
	if err != nil || seg.DataCRCOK || len(seg.Metablocks) != seg.Count {
		t.Fatalf("Segment: %+v, %v", seg, err)
	}
}

func TestCheckSuperblockCopies(t *testing.T) {
	cache := buildCache(t, true)
	flipByte(t, cache, layout.SuperblockOffsets[1]+16)
	rep, err := Check(cache, cache.Size(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Superblocks[1].Valid || !rep.Superblocks[0].Valid || !rep.Corrupt() {
		t.Fatalf("damaged copy 1 not reported: %+v %v", rep.Superblocks, rep.Problems)
	}
	// Both gone: not a cache at all.
	flipByte(t, cache, layout.SuperblockOffsets[0]+16)
	if _, err := Check(cache, cache.Size(), Options{}); err == nil {
		t.Fatal("Check accepted a device without a superblock")
	}
	blank := blockdev.NewMem(1<<20, nil)
	if _, err := Check(blank, blank.Size(), Options{}); err == nil {
		t.Fatal("Check accepted a blank device")
	}
}

func itoa(v uint64) string {
	var b []byte
	for {
		b = append([]byte{byte('0' + v%10)}, b...)
		v /= 10
		if v == 0 {
			return string(b)
		}
	}
}

// flipByte flips one bit of the byte at off (the device takes whole sectors).
func flipByte(t *testing.T, d blockdev.Device, off int64) {
	t.Helper()
	sec := make([]byte, blockdev.SectorSize)
	base := off / blockdev.SectorSize * blockdev.SectorSize
	if _, err := d.ReadAt(sec, base); err != nil {
		t.Fatal(err)
	}
	sec[off-base] ^= 0x40
	if _, err := d.WriteAt(sec, base); err != nil {
		t.Fatal(err)
	}
}

// TestCheckReadsBothHeaderCopies: two flushes write an open segment twice,
// into header copy 0 then copy 1. Check describes the newer copy; when the
// newer write's data is torn (the end of the log after a crash), it falls
// back to the older copy, as recovery does, and reports no corruption.
func TestCheckReadsBothHeaderCopies(t *testing.T) {
	cache := blockdev.NewMem(16<<20, nil)
	e, err := engine.Open(engine.Options{Cache: cache, Backing: blockdev.NewMem(64<<20, nil), Format: true,
		SegmentSize: 64 << 10, Tunables: engine.DefaultTunables()})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	buf := make([]byte, 4096)
	for i := 0; i < 2; i++ {
		buf[0] = byte(i + 1)
		if _, err := e.WriteAt(buf, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	img := cache.CrashImage(blockdev.CrashDropAll, rand.New(rand.NewSource(1)))
	rep, err := Check(img, img.Size(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Corrupt() || len(rep.Live) != 1 || rep.Live[0].Count != 2 || rep.Live[0].HeaderCopy != 1 || rep.Live[0].Problem != "" {
		t.Fatalf("two flushes into one segment: %+v, problems %v; want one live segment of 2 entries from header copy 1", rep.Live, rep.Problems)
	}
	// Tear the second flush's data block.
	flipByte(t, img, rep.Live[0].Offset+2*layout.BlockSize+7)
	rep, err = Check(img, img.Size(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Corrupt() || len(rep.Live) != 1 || rep.Live[0].Count != 1 || rep.Live[0].HeaderCopy != 0 || !rep.Live[0].DataCRCOK {
		t.Fatalf("torn second write: %+v, problems %v; want segment 1 from header copy 0 with 1 entry", rep.Live, rep.Problems)
	}
}
