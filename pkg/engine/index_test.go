package engine

import (
	"math/rand"
	"testing"
)

// TestIndexAgainstMap drives the index and a plain map with the same random
// operations and compares them after every step.
func TestIndexAgainstMap(t *testing.T) {
	for _, positions := range []int{1, 7, 64, 1000} {
		rng := rand.New(rand.NewSource(int64(positions)))
		x := newIndex(positions)
		ref := map[uint64]uint32{}
		owner := map[uint32]uint64{} // pos -> block it holds in the index
		for step := 0; step < 20000; step++ {
			block := uint64(rng.Intn(positions * 3))
			if rng.Intn(3) == 0 {
				if pos, ok := ref[block]; ok {
					if !x.remove(block, pos) {
						t.Fatalf("remove(%d,%d) found nothing", block, pos)
					}
					x.meta[pos] = 0
					delete(ref, block)
					delete(owner, pos)
				}
			} else {
				// pick a free position
				pos := uint32(rng.Intn(positions))
				if _, used := owner[pos]; used {
					continue
				}
				x.meta[pos] = packMeta(block, 0xff, flagValid|flagDirty)
				old, replaced := x.insert(pos)
				want, had := ref[block]
				if replaced != had || (had && old != want) {
					t.Fatalf("insert: got (%d,%v) want (%d,%v)", old, replaced, want, had)
				}
				if had {
					delete(owner, want)
					x.meta[want] = 0
				}
				ref[block] = pos
				owner[pos] = block
			}
			if step%97 == 0 || positions < 100 {
				if x.n != len(ref) {
					t.Fatalf("step %d: n=%d want %d", step, x.n, len(ref))
				}
				for b, p := range ref {
					got, ok := x.lookup(b)
					if !ok || got != p {
						t.Fatalf("step %d: lookup(%d) = %d,%v want %d", step, b, got, ok, p)
					}
				}
				for i := 0; i < 5; i++ {
					b := uint64(positions*3 + rng.Intn(100))
					if _, ok := x.lookup(b); ok {
						t.Fatalf("lookup of absent block %d succeeded", b)
					}
				}
			}
		}
	}
}

// BenchmarkIndexBytesPerBlock reports the index memory per cached 4 KiB
// block for a full 4 GiB cache (issue goal: <= 16 bytes).
func BenchmarkIndexBytesPerBlock(b *testing.B) {
	const positions = 4 << 30 / 4096
	for i := 0; i < b.N; i++ {
		x := newIndex(positions)
		for p := 0; p < positions; p++ {
			x.meta[p] = packMeta(uint64(p)*7, 0xff, flagValid|flagDirty)
			x.insert(uint32(p))
		}
		b.ReportMetric(float64(x.bytes())/positions, "index-bytes/block")
	}
}
