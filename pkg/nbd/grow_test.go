package nbd

import (
	"sync/atomic"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// growingBackend shows a prefix of a bigger RAM disk, as the engine shows
// its backing size: Size goes up when the volume grows.
type growingBackend struct {
	*MemBackend
	size atomic.Int64
}

func (g *growingBackend) Size() int64 { return g.size.Load() }

// TestExportGrowsLive: once the backend grows, a connection made before
// addresses the new range (the kernel's device, resized, sends there) and
// a new connection is told the new size.
func TestExportGrowsLive(t *testing.T) {
	const small, big = 64 << 10, 256 << 10
	b := &growingBackend{MemBackend: NewMemBackend(big)}
	b.size.Store(small)
	_, path := startServer(t, Config{}, Export{Name: "v", Backend: b})
	c := connect(t, path, "v")
	if c.size != small {
		t.Fatalf("advertised %d, want %d", c.size, small)
	}
	p := make([]byte, 4096)
	if r := c.do(nbdproto.CmdWrite, 0, small, 4096, p); r.errno != nbdproto.ErrNoSpc {
		t.Fatalf("write past the end before the grow: errno %d, want ENOSPC", r.errno)
	}
	b.size.Store(big)
	if r := c.do(nbdproto.CmdWrite, 0, big-4096, 4096, p); r.errno != 0 {
		t.Fatalf("write at the new end on an old connection: errno %d", r.errno)
	}
	if r := c.do(nbdproto.CmdRead, 0, big, 512, nil); r.errno != nbdproto.ErrInval {
		t.Fatalf("read past the new end: errno %d, want EINVAL", r.errno)
	}
	if c2 := connect(t, path, "v"); c2.size != big {
		t.Fatalf("a new connection was told %d, want %d", c2.size, big)
	}
}
