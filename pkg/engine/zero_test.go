package engine

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// TestZeroAroundReportsFlushError: in write-around mode a WRITE_ZEROES is
// acknowledged as durable on the backing device, so a failed backing
// flush must fail it. Before, the flush's error was dropped.
func TestZeroAroundReportsFlushError(t *testing.T) {
	backing := blockdev.NewFaulty(blockdev.NewMem(8<<20, nil))
	e := openTest(t, blockdev.NewMem(testCacheSize(16), nil), backing, func(o *Options) { o.Tunables.WriteAroundMode = true })
	defer e.Close()
	backing.FailFlushesAfter(0, errors.New("injected"))
	if err := e.WriteZeroes(0, 16*blockSize); !errors.Is(err, ErrIO) {
		t.Fatalf("write-around WRITE_ZEROES with a failing backing flush: %v, want ErrIO", err)
	}
	backing.Reset()
	if err := e.WriteZeroes(0, 16*blockSize); err != nil {
		t.Fatalf("WRITE_ZEROES once the backing device works again: %v", err)
	}
}

// noWriteZeroes hides the wrapped device's cheap Zero: the platters of an
// HDD, which has no WRITE ZEROES command, so zeros are written.
type noWriteZeroes struct{ blockdev.Device }

// TestTrimCostsBackingNothing: a TRIM of the whole device (mkfs, fstrim)
// does no backing I/O at all, drops the cached copies (dirty ones are not
// written back), and reads go on; a later write wins. Before, TRIM was a
// WRITE_ZEROES: the whole range zeroed on the backing device inside the
// request.
func TestTrimCostsBackingNothing(t *testing.T) {
	const size = 64 << 20
	backing := blockdev.NewCounting(blockdev.NewMem(size, nil))
	e := openTest(t, blockdev.NewMem(testCacheSize(64), nil), backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	defer e.Close()
	writeBlocks(t, e, 100, 7)
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	before := backing.Snapshot()
	if err := e.Trim(0, size); err != nil {
		t.Fatal(err)
	}
	if d := backing.Snapshot().Sub(before); d.WriteOps+d.Zeroes+d.Discards+d.Flushes != 0 {
		t.Fatalf("TRIM of %d bytes cost the backing device %+v", size, d)
	}
	if n := e.Status().NrDirtyCacheBlocks; n != 0 {
		t.Fatalf("%d dirty blocks survive a TRIM of everything", n)
	}
	p := bytes.Repeat([]byte{9}, blockSize)
	if _, err := e.WriteAt(p, 7*blockSize); err != nil {
		t.Fatal(err)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if d := backing.Snapshot().Sub(before); d.WriteBytes != blockSize || d.Zeroes+d.Discards != 0 {
		t.Fatalf("writeback after the TRIM: %+v, want the one block written after it", d)
	}
	q := make([]byte, blockSize)
	if _, err := e.ReadAt(q, 7*blockSize); err != nil || !bytes.Equal(p, q) {
		t.Fatalf("write after TRIM reads back wrong (%v)", err)
	}
}

// TestTrimPassedDownWhenAsked: with BackingDiscard (a thin pool that asks
// for it) the TRIM reaches the backing device as a discard, not as zeros.
func TestTrimPassedDownWhenAsked(t *testing.T) {
	backing := blockdev.NewCounting(blockdev.NewMem(8<<20, nil))
	e := openTest(t, blockdev.NewMem(testCacheSize(16), nil), backing, func(o *Options) { o.BackingDiscard = true })
	defer e.Close()
	before := backing.Snapshot()
	if err := e.Trim(blockSize, 1<<20); err != nil {
		t.Fatal(err)
	}
	if d := backing.Snapshot().Sub(before); d.Discards != 1 || d.DiscardBytes != 1<<20 || d.Zeroes+d.WriteOps != 0 {
		t.Fatalf("passed-down TRIM: %+v, want one discard of the whole blocks", d)
	}
	_, err := Open(Options{Cache: blockdev.NewMem(testCacheSize(16), nil), Backing: noWriteZeroes{blockdev.NewMem(8<<20, nil)},
		Format: true, SegmentSize: testSegSize, RAMBuffers: 2, BackingDiscard: true})
	if err == nil {
		t.Fatal("BackingDiscard accepted for a backing device that cannot discard")
	}
}

// TestWriteZeroesDeferred: WRITE_ZEROES reads back as zeros at once and
// after a crash, costs the request no backing I/O, and writeback zeroes
// the backing device later, in place.
func TestWriteZeroesDeferred(t *testing.T) {
	const size = 16 << 20
	cache, mem := blockdev.NewMem(testCacheSize(32), nil), blockdev.NewMem(size, nil)
	backing := blockdev.NewCounting(mem)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	ones := bytes.Repeat([]byte{1}, 4<<20)
	if _, err := e.WriteAt(ones, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	before := backing.Snapshot()
	// A partial block at each edge, 254 whole blocks between.
	if err := e.WriteZeroes(512, 1<<20-1024); err != nil {
		t.Fatal(err)
	}
	if d := backing.Snapshot().Sub(before); d.WriteOps+d.Zeroes+d.Flushes != 0 {
		t.Fatalf("WRITE_ZEROES cost the request %+v on the backing device", d)
	}
	check := func(e *Engine, what string) {
		t.Helper()
		p := make([]byte, 2<<20)
		if _, err := e.ReadAt(p, 0); err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(ones[:2<<20])
		clear(want[512 : 1<<20-512])
		if i := firstDiff(p, want); i >= 0 {
			t.Fatalf("%s: byte %d reads %d", what, i, p[i])
		}
	}
	check(e, "before writeback")
	if z := e.Status().PendingZeroBlocks; z != 254 {
		t.Fatalf("pending zero blocks %d, want 254", z)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	halt(e) // a power cut: the backing device still holds the ones
	crashCache := cache.CrashImage(blockdev.CrashDropAll, nil)
	crashBacking := blockdev.NewCounting(mem.CrashImage(blockdev.CrashDropAll, nil))
	e = openTest(t, crashCache, crashBacking, func(o *Options) { o.Format = false; o.Tunables.WritebackThreshold = 0 })
	defer e.Close()
	check(e, "after a crash")
	if d := crashBacking.Snapshot(); d.Zeroes != 0 {
		t.Fatalf("recovery zeroed the backing device (%+v): it is writeback's job", d)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if d := crashBacking.Snapshot(); d.ZeroBytes != 254*blockSize {
		t.Fatalf("writeback zeroed %d bytes, want %d", d.ZeroBytes, 254*blockSize)
	}
	if z := e.Status().PendingZeroBlocks; z != 0 {
		t.Fatalf("%d zero blocks pending after a drain", z)
	}
	raw := make([]byte, 2<<20)
	crashBacking.ReadAt(raw, 0)
	want := bytes.Clone(ones[:2<<20])
	clear(want[512 : 1<<20-512])
	if i := firstDiff(raw, want); i >= 0 {
		t.Fatalf("backing device after writeback: byte %d is %d", i, raw[i])
	}
	check(e, "after writeback")
}

// TestFormatTiBOverHDDModel: what mkfs.ext4 asks of a 1 TiB volume (a
// TRIM of everything, a 1 GiB journal zeroed, metadata written, a flush)
// takes the simulated HDD, which writes zeros itself, no time in the
// requests; writeback zeroes the journal afterwards. Before, the TRIM alone
// kept the disk busy for about 1.7 hours (1 TiB at 180 MB/s) inside one
// request.
func TestFormatTiBOverHDDModel(t *testing.T) {
	const tib = int64(1) << 40
	disk := hddsim.New(noWriteZeroes{blockdev.NewMem(tib, nil)}, hddsim.DefaultModel(), hddsim.Virtual)
	e := openTest(t, blockdev.NewMem(testCacheSize(256), nil), disk, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	defer e.Close()
	if err := e.Trim(0, tib); err != nil {
		t.Fatal(err)
	}
	journal := tib / 2
	if err := e.WriteZeroes(journal, 1<<30); err != nil {
		t.Fatal(err)
	}
	meta := make([]byte, 64<<10)
	for g := int64(0); g < 64; g++ { // group descriptors, bitmaps of some groups
		meta[0] = byte(g)
		if _, err := e.WriteAt(meta, g*(128<<20)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1<<20)
	if _, err := e.ReadAt(p, journal+(1<<29)); err != nil || firstDiff(p, make([]byte, len(p))) >= 0 {
		t.Fatalf("journal does not read as zeros (%v)", err)
	}
	if busy := disk.Busy(); busy > time.Second {
		t.Fatalf("formatting 1 TiB kept the simulated HDD busy for %v in the requests, want well under a second", busy)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	// 1 GiB of zeros at 180 MB/s: about 6 s of disk time, in writeback.
	if busy := disk.Busy(); busy < 5*time.Second || busy > 30*time.Second {
		t.Fatalf("writeback spent %v of disk time, want the journal's 1 GiB of zeros (about 6 s)", busy)
	}
}

// TestOpenUpgradesVersion1: a version 1 cache is rewritten as version 2
// when opened, before a trim record (unknown to version 1) can be written,
// so an older binary refuses it rather than cutting its log short.
func TestOpenUpgradesVersion1(t *testing.T) {
	cache := blockdev.NewMem(testCacheSize(16), nil)
	e := openTest(t, cache, blockdev.NewMem(8<<20, nil), nil)
	sb := e.sb
	backing := e.backing.Device
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	sb.Version = 1
	buf := make([]byte, blockSize)
	sb.Encode(buf)
	for _, off := range layout.SuperblockOffsets {
		if _, err := cache.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	e = openTest(t, cache, backing, func(o *Options) { o.Format = false })
	defer e.Close()
	two := make([]byte, 2*blockSize)
	cache.ReadAt(two, 0)
	got, err := layout.ChooseSuperblock(two[:blockSize], two[blockSize:])
	if err != nil || got.Version != layout.Version || got.Seq != sb.Seq+1 {
		t.Fatalf("superblock after opening a version 1 cache: %+v, %v; want version %d", got, err, layout.Version)
	}
}
