package engine

import (
	"encoding/binary"
	"errors"
	"math/rand"
	"sync"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// FuzzOpenCorrupt: recovery decodes everything it finds on the cache
// device (superblocks, checkpoints, segment headers and data) and in the
// RAM buffers a killed process left behind. Whatever the corruption, Open
// either refuses with an error or opens a cache that serves every read and
// closes; it never panics or hangs.
func FuzzOpenCorrupt(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0, 0, 0, 1, 0xff})                               // superblock A
	f.Add([]byte{0, 0, 0x20, 0x10, 0x01})                         // checkpoint
	f.Add([]byte{1, 0, 0, 0x1c, 0x40})                            // a segment header's count
	f.Add([]byte{1, 3, 0, 0x30, 0x07})                            // a metablock of another slot
	f.Add([]byte{2, 0, 0, 0x10, 0x02})                            // a RAM buffer's id
	f.Add([]byte{2, 0, 0x10, 0x42, 0x80})                         // a RAM buffer's metablock
	f.Add([]byte{3, 0x0a, 0x12, 0x34, 1})                         // anywhere
	f.Add([]byte{0, 0, 0x10, 0x00, 0x5a, 0, 0, 0x30, 0x00, 0x5a}) // both checkpoints
	base := fuzzBase(f)
	f.Fuzz(func(t *testing.T, edits []byte) {
		cache := memFrom(t, base.cache)
		mem := NewHeapBuffer(len(base.buf))
		copy(mem.Bytes(), base.buf)
		for ; len(edits) >= 5; edits = edits[5:] {
			off := int(edits[1])<<16 | int(edits[2])<<8 | int(edits[3])
			x := edits[4]
			switch edits[0] % 4 {
			case 0: // superblocks and checkpoints
				off %= int(layout.CheckpointOffsets[1]) + layout.BlockSize
			case 1: // a segment header
				off = int(layout.RingOffset) + int(edits[1]%testSegments)*testSegSize + off%layout.BlockSize
			case 2: // the RAM buffers
				b := mem.Bytes()
				b[off%len(b)] ^= x
				continue
			default:
			}
			off %= len(base.cache)
			var one [1]byte
			cache.ReadAt(one[:], int64(off))
			one[0] ^= x
			cache.WriteAt(one[:], int64(off))
		}
		e, err := Open(Options{Cache: cache, Backing: memFrom(t, base.backing), SegmentSize: testSegSize,
			RAMBuffers: 2, Buffer: mem, Tunables: noWriteback()})
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrBlank) && !errors.Is(err, ErrForeign) &&
				!errors.Is(err, ErrNewerFormat) && !errors.Is(err, ErrBackingSize) {
				t.Fatalf("refused without naming a cause (corrupt, blank, foreign, newer, backing size): %v", err)
			}
			return
		}
		p := make([]byte, crashSize)
		if _, err := e.ReadAt(p, 0); err != nil {
			t.Fatalf("opened, but a read fails: %v", err)
		}
		if _, err := e.WriteAt(p[:blockSize], 4*blockSize); err != nil {
			t.Fatalf("opened, but a write fails: %v", err)
		}
		if err := e.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
	})
}

type fuzzImages struct{ cache, backing, buf []byte }

var (
	fuzzOnce sync.Once
	fuzzImg  fuzzImages
)

// fuzzBase makes a cache with dirty segments, a discard, a written-back
// prefix and RAM buffers left by a "killed" process.
func fuzzBase(tb testing.TB) fuzzImages {
	fuzzOnce.Do(func() {
		cache, backing := blockdev.NewMem(testCacheSize(testSegments), nil), blockdev.NewMem(crashSize, nil)
		mem := NewHeapBuffer(BufferBytes(testSegSize, 2))
		e := openTest(tb, cache, backing, func(o *Options) { o.Buffer = mem; o.Tunables.WritebackThreshold = 0 })
		rng := rand.New(rand.NewSource(1))
		p := make([]byte, 3*blockSize)
		for i := 0; i < 40; i++ {
			binary.LittleEndian.PutUint64(p, uint64(i))
			off := rng.Int63n(crashSize/512-6) * 512
			if _, err := e.WriteAt(p[:512*(1+rng.Intn(17))], off); err != nil {
				tb.Fatal(err)
			}
			if i == 20 {
				if err := e.WriteZeroes(64*blockSize, 16*blockSize); err != nil {
					tb.Fatal(err)
				}
			}
			if i%10 == 9 {
				if err := e.Flush(); err != nil {
					tb.Fatal(err)
				}
			}
		}
		// The kill: stop without Close; RAM buffers stay in mem.
		halt(e)
		fuzzImg = fuzzImages{cache: readAll(tb, cache), backing: readAll(tb, backing), buf: append([]byte(nil), mem.Bytes()...)}
	})
	return fuzzImg
}

func readAll(tb testing.TB, d blockdev.Device) []byte {
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		tb.Fatal(err)
	}
	return b
}

func memFrom(tb testing.TB, b []byte) *blockdev.Mem {
	m := blockdev.NewMem(int64(len(b)), nil)
	if _, err := m.WriteAt(b, 0); err != nil {
		tb.Fatal(err)
	}
	if err := m.Flush(); err != nil {
		tb.Fatal(err)
	}
	return m
}
