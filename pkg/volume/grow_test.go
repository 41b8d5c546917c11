package volume

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"
)

// TestGrowLive grows a running, attached volume: the backing's storage
// first (as the pool does), then Volume.Grow takes it into the engine and
// resizes the device. A failure of the device's resize leaves the engine
// grown and the device not; the retry converges. Data written before
// stays, the grown range reads zeros, and the export serves the new size.
func TestGrowLive(t *testing.T) {
	m := newMemVolume(t)
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Stop(ctx)
	data := bytes.Repeat([]byte{0xcd}, 4096)
	if _, err := v.Engine().WriteAt(data, testBacking-4096); err != nil {
		t.Fatal(err)
	}
	const grown = 2 * testBacking
	m.att.fail("resize", syscall.EIO)
	if err := v.Grow(ctx, grown); !errors.Is(err, syscall.EIO) {
		t.Fatalf("grow with a failing resize: %v, want EIO", err)
	}
	if v.Engine().Size() != grown {
		t.Fatalf("engine at %d after the failed resize, want %d", v.Engine().Size(), grown)
	}
	if a, _ := v.Attachment(); a.Size != testBacking {
		t.Fatalf("device at %d after the failed resize, want %d", a.Size, testBacking)
	}
	if err := v.Grow(ctx, grown); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if a, _ := v.Attachment(); a.Size != grown {
		t.Fatalf("device at %d after the retry, want %d", a.Size, grown)
	}
	if err := v.Grow(ctx, grown); err != nil {
		t.Fatalf("repeated grow: %v", err)
	}
	got := make([]byte, testBacking)
	if _, err := v.Engine().ReadAt(got, testBacking); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, testBacking)) {
		t.Fatal("the grown range does not read as zeros")
	}
	if _, err := v.Engine().ReadAt(got[:4096], testBacking-4096); err != nil || !bytes.Equal(got[:4096], data) {
		t.Fatalf("data before the old end: %v", err)
	}
	if err := v.Grow(ctx, testBacking); err == nil {
		t.Fatal("a shrink was accepted")
	}
}
