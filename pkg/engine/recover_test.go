package engine

import (
	"math/rand"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// fillCache writes random 4 KiB blocks until about frac of the ring holds
// dirty segments, with background writeback off, and flushes.
func fillCache(t testing.TB, e *Engine, frac float64) {
	t.Helper()
	st := e.Status()
	n := int(float64(st.NrCacheBlocks) * frac)
	rng := rand.New(rand.NewSource(1))
	p := make([]byte, blockSize)
	blocks := e.Size() / blockSize
	for i := 0; i < n; i++ {
		rng.Read(p[:16])
		if _, err := e.WriteAt(p, rng.Int63n(blocks)*blockSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
}

// openCounted reopens a cache and reports how many bytes recovery read
// from the cache device.
func openCounted(t testing.TB, cache, backing blockdev.Device) (*Engine, int64) {
	t.Helper()
	c := blockdev.NewCounting(cache)
	e, err := Open(Options{Cache: c, Backing: backing, Tunables: noWriteback()})
	if err != nil {
		t.Fatal(err)
	}
	return e, c.Snapshot().ReadBytes
}

func noWriteback() Tunables {
	t := DefaultTunables()
	t.WritebackThreshold = 0
	return t
}

// TestRecoveryReadsLittle: opening a cache full of dirty segments reads
// only segment headers after a clean close, and little more after a crash
// (checkpoints record how far the log was durable).
func TestRecoveryReadsLittle(t *testing.T) {
	const cacheSize = 64 << 20
	cache, backing := blockdev.NewMem(cacheSize, nil), blockdev.NewMem(256<<20, nil)
	e, err := Open(Options{Cache: cache, Backing: backing, Format: true, Tunables: noWriteback()})
	if err != nil {
		t.Fatal(err)
	}
	fillCache(t, e, 0.6) // below the 3/4 mark where writeback is urged even when off
	dirty := e.Status().NrDirtyCacheBlocks
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e, clean := openCounted(t, cache, backing)
	if got := e.Status().NrDirtyCacheBlocks; got != dirty {
		t.Fatalf("after clean reopen %d dirty blocks, want %d", got, dirty)
	}
	t.Logf("clean open read %d bytes = %.2f%% of the cache device", clean, 100*float64(clean)/cacheSize)
	if clean > cacheSize/20 {
		t.Fatalf("clean open read %d bytes, more than 5%% of the %d-byte cache", clean, cacheSize)
	}
	// Crash: drop everything not flushed, without Close.
	fillCache(t, e, 0.02)
	dirty = e.Status().NrDirtyCacheBlocks
	halt(e)
	img := cache.CrashImage(blockdev.CrashDropAll, rand.New(rand.NewSource(1)))
	e, crashed := openCounted(t, img, backing)
	if got := e.Status().NrDirtyCacheBlocks; got != dirty {
		t.Fatalf("after crash %d dirty blocks, want %d", got, dirty)
	}
	t.Logf("crashed open read %d bytes = %.2f%% of the cache device", crashed, 100*float64(crashed)/cacheSize)
	if crashed > cacheSize/10 {
		t.Fatalf("open after a crash read %d bytes, more than 10%% of the cache", crashed)
	}
	e.Close()
}

// TestOpenRefuses: blank, foreign, mismatched caches are refused with
// errors naming the cause.
func TestOpenRefuses(t *testing.T) {
	cache, backing := blockdev.NewMem(8<<20, nil), blockdev.NewMem(8<<20, nil)
	if _, err := Open(Options{Cache: cache, Backing: backing}); !isErr(err, ErrBlank) {
		t.Fatalf("blank device: got %v, want ErrBlank", err)
	}
	foreign := make([]byte, 8192)
	copy(foreign, "an ext4 filesystem, say")
	cache.WriteAt(foreign, 0)
	if _, err := Open(Options{Cache: cache, Backing: backing, Format: true}); !isErr(err, ErrForeign) {
		t.Fatalf("foreign device: got %v, want ErrForeign", err)
	}
	e, err := Open(Options{Cache: cache, Backing: backing, Reformat: true})
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	if _, err := Open(Options{Cache: cache, Backing: blockdev.NewMem(4<<20, nil)}); !isErr(err, ErrBackingSize) {
		t.Fatalf("smaller backing: got %v, want ErrBackingSize", err)
	}
	if _, err := Open(Options{Cache: cache, Backing: blockdev.NewMem(16<<20, nil)}); !isErr(err, ErrBackingSize) {
		t.Fatalf("larger backing without AllowBackingGrowth: got %v, want ErrBackingSize", err)
	}
	e, err = Open(Options{Cache: cache, Backing: blockdev.NewMem(16<<20, nil), AllowBackingGrowth: true})
	if err != nil {
		t.Fatal(err)
	}
	if e.Size() != 16<<20 {
		t.Fatalf("size after growth %d", e.Size())
	}
	e.Close()
	// A torn superblock copy is survived; both torn is corruption.
	b := make([]byte, blockSize)
	b[100] = 1
	cache.WriteAt(b, layout.SuperblockOffsets[0])
	e, err = Open(Options{Cache: cache, Backing: blockdev.NewMem(16<<20, nil)})
	if err != nil {
		t.Fatalf("one torn superblock copy: %v", err)
	}
	e.Close()
	cache.WriteAt(b, layout.SuperblockOffsets[1])
	if _, err := Open(Options{Cache: cache, Backing: blockdev.NewMem(16<<20, nil)}); !isErr(err, ErrCorrupt) && !isErr(err, ErrForeign) {
		t.Fatalf("both copies torn: got %v, want ErrCorrupt", err)
	}
}

// TestPassedOverCopyStaysDead: a segment written by two flushes has two
// header copies; when the later one's data is torn, recovery takes the
// earlier copy. Once that open's checkpoint counts the segment as durable,
// a later open checks no data, so the torn copy must not win then: recovery
// makes the copies agree before it writes its checkpoint.
func TestPassedOverCopyStaysDead(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(testSegments), nil), blockdev.NewMem(crashSize, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables = noWriteback() })
	a, b := make([]byte, blockSize), make([]byte, blockSize)
	for i := range a {
		a[i], b[i] = 0xaa, 0xbb
	}
	for i, p := range [][]byte{a, b} {
		if _, err := e.WriteAt(p, int64(i)*blockSize); err != nil {
			t.Fatal(err)
		}
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if st := e.Status(); st.CurrentID != 1 || st.NrPartialFlushed != 2 {
		t.Fatalf("two one-block flushes: segment %d, %d partial flushes; want both in segment 1", st.CurrentID, st.NrPartialFlushed)
	}
	halt(e)
	// The second flush's data block torn: its header copy (1) is valid,
	// its data checksum is not.
	geo := layout.Geometry{SegmentSize: testSegSize, NrSegments: testSegments}
	torn := make([]byte, blockSize)
	for i := range torn {
		torn[i] = 0xcc
	}
	if _, err := cache.WriteAt(torn, geo.DataBlockOffset(1, 1)); err != nil {
		t.Fatal(err)
	}
	check := func(e *Engine, what string) {
		t.Helper()
		got := make([]byte, 2*blockSize)
		if _, err := e.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if string(got[:blockSize]) != string(a) {
			t.Fatalf("%s: block 0, flushed in the first copy, lost", what)
		}
		if string(got[blockSize:]) != string(make([]byte, blockSize)) {
			t.Fatalf("%s: block 1 reads %#x..., want its old zeros (its write was torn)", what, got[blockSize:blockSize+4])
		}
	}
	e2, err := Open(Options{Cache: cache, Backing: backing, Tunables: noWriteback()})
	if err != nil {
		t.Fatal(err)
	}
	check(e2, "first open")
	if st := e2.Status(); st.LastFlushedID < 1 {
		t.Fatalf("the open's checkpoint does not count segment 1 as durable (last flushed %d): the test proves nothing", st.LastFlushedID)
	}
	halt(e2)
	e3, err := Open(Options{Cache: cache, Backing: backing, Tunables: noWriteback()})
	if err != nil {
		t.Fatal(err)
	}
	defer e3.Close()
	check(e3, "second open")
}

// TestFlushAfterBurstBoundsCrashRecovery: a checkpoint claims only what
// was durable before it, so the record written by the one flush after a
// bulk write would leave a crash recovery reading the data of every
// segment of the burst. The flusher writes a second record before it
// releases the flush, so a crash right after reads little.
func TestFlushAfterBurstBoundsCrashRecovery(t *testing.T) {
	const cacheSize = 64 << 20
	cache, backing := blockdev.NewMem(cacheSize, nil), blockdev.NewMem(256<<20, nil)
	e, err := Open(Options{Cache: cache, Backing: backing, Format: true, Tunables: noWriteback()})
	if err != nil {
		t.Fatal(err)
	}
	// A burst with no flush, the flusher done writing its segments (so
	// the flush below is one round of the flusher), then one flush.
	p := make([]byte, 64<<10)
	for i := 0; i < cacheSize/2/len(p); i++ {
		p[0] = byte(i)
		if _, err := e.WriteAt(p, int64(i)*int64(len(p))); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "flusher idle", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.mu.writtenID == e.mu.sealedID && e.mu.writtenID > 50
	})
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	dirty := e.Status().NrDirtyCacheBlocks
	img := cache.CrashImage(blockdev.CrashDropAll, rand.New(rand.NewSource(1)))
	e.Close()
	e2, read := openCounted(t, img, backing)
	defer e2.Close()
	if got := e2.Status().NrDirtyCacheBlocks; got != dirty {
		t.Fatalf("after the crash %d dirty blocks, want %d", got, dirty)
	}
	t.Logf("crash right after the flush of a burst: open read %d bytes = %.2f%% of the cache device", read, 100*float64(read)/cacheSize)
	if read > cacheSize/20 {
		t.Fatalf("open after a crash read %d bytes, more than 5%% of the cache: the flush left the checkpoint behind", read)
	}
}
