package engine

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// TestBufferFileOnFullTmpfs: a RAM-buffer file that the tmpfs cannot hold
// is refused at open. Before, the resize's error was dropped and Truncate
// alone never fails on tmpfs, so the engine mapped pages that did not
// exist and died of SIGBUS on its first write into them.
func TestBufferFileOnFullTmpfs(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount a 1 MiB tmpfs: %v", err)
	}
	defer unix.Unmount(dir, 0)
	path := filepath.Join(dir, "buf")
	if m, err := OpenBufferFile(path, 4<<20); err == nil {
		m.Close()
		t.Fatal("a 4 MiB buffer file on a 1 MiB tmpfs was accepted")
	}
	// What fits is accepted, and every page is there to be written.
	m, err := OpenBufferFile(path, 512<<10)
	if err != nil {
		t.Fatalf("a 512 KiB buffer file on a 1 MiB tmpfs: %v", err)
	}
	defer m.Close()
	b := m.Bytes()
	for i := 0; i < len(b); i += os.Getpagesize() {
		b[i] = 1
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 < 512<<10 {
		t.Fatalf("buffer file has %d bytes allocated, want 512 KiB", st.Blocks*512)
	}
}
