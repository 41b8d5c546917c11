package engine

import (
	"errors"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
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
