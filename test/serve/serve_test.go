package serve

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// TestServeDefaults runs serve with no arguments in an empty directory,
// looks at the export with nbdinfo, writes and reads through qemu-io,
// drives the control commands, stops with SIGTERM, checks the cache, and
// restarts to read the data back.
func TestServeDefaults(t *testing.T) {
	testenv.RequireTools(t, "nbdinfo", "qemu-io")
	dir := t.TempDir()
	s := startServe(t, dir)

	// Sparse default images and private sockets.
	for name, size := range map[string]int64{"backing.img": 4 << 30, "cache.img": 1 << 30} {
		st, err := os.Stat(filepath.Join(s.dataDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() != size {
			t.Errorf("%s: size %d, want %d", name, st.Size(), size)
		}
		if used := st.Sys().(*syscall.Stat_t).Blocks * 512; used > size/8 {
			t.Errorf("%s: %d bytes allocated of %d: not sparse", name, used, size)
		}
	}
	for _, sock := range []string{s.socket, s.control} {
		st, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want a 0600 socket", sock, st.Mode())
		}
	}

	out, _ := run(t, time.Minute, false, "nbdinfo", "--json", s.uri)
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	ex := info.Exports[0]
	if got := ex["export-size"]; got != float64(4<<30) {
		t.Errorf("nbdinfo export-size = %v, want %d", got, 4<<30)
	}
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero"} {
		if ex[k] != true {
			t.Errorf("nbdinfo %s = %v, want true", k, ex[k])
		}
	}
	if ex["is_read_only"] != false {
		t.Errorf("nbdinfo is_read_only = %v", ex["is_read_only"])
	}

	// Dirty some blocks with background writeback off, so drain has work.
	wb(t, false, "set", "--control", s.control, "writeback_threshold=0", "nr_max_batched_writeback=4")
	run(t, time.Minute, false, "qemu-io", "-f", "raw", s.uri,
		"-c", "write -P 0xa5 1M 8M", "-c", "write -P 0x5a 100M 512k", "-c", "flush")
	st := status(t, s)
	if st["nr_dirty_cache_blocks"].(float64) < 2048 {
		t.Errorf("nr_dirty_cache_blocks = %v after writing 8.5 MiB with writeback off", st["nr_dirty_cache_blocks"])
	}
	tun := st["tunables"].(map[string]any)
	if tun["writeback_threshold"] != float64(0) || tun["nr_max_batched_writeback"] != float64(4) {
		t.Errorf("tunables after set: %v", tun)
	}
	for _, k := range []string{"cursor", "nr_cache_blocks", "nr_segments", "current_id", "last_flushed_id", "last_writeback_id", "stat"} {
		if _, ok := st[k]; !ok {
			t.Errorf("status --json lacks %q", k)
		}
	}
	text, _ := wb(t, false, "status", "--control", s.control)
	if !strings.Contains(text, "nr_dirty_cache_blocks") || !strings.Contains(text, "writeback_threshold") {
		t.Errorf("status text:\n%s", text)
	}

	// A static tunable and a bad value are refused and change nothing.
	for _, bad := range []string{"write_around_mode=1", "writeback_threshold=101", "no_such=1"} {
		out, err := wb(t, true, "set", "--control", s.control, "nr_max_batched_writeback=8", bad)
		if err == nil {
			t.Errorf("set %s succeeded:\n%s", bad, out)
		}
	}
	if got := status(t, s)["tunables"].(map[string]any)["nr_max_batched_writeback"]; got != float64(4) {
		t.Errorf("a refused set changed nr_max_batched_writeback to %v", got)
	}

	out, _ = wb(t, false, "drain", "--control", s.control)
	if !strings.Contains(out, "nothing dirty") {
		t.Errorf("drain output:\n%s", out)
	}
	if d := status(t, s)["nr_dirty_cache_blocks"]; d != float64(0) {
		t.Errorf("nr_dirty_cache_blocks = %v after drain", d)
	}
	wb(t, false, "clear-stat", "--control", s.control)
	wb(t, false, "flush", "--control", s.control)

	// New dirty data, left in the cache for the restart to find.
	run(t, time.Minute, false, "qemu-io", "-f", "raw", s.uri, "-c", "write -P 0x3c 200M 4M", "-c", "flush")

	if code := s.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("serve exited %d after SIGTERM:\n%s", code, s.out.String())
	}
	for _, sock := range []string{s.socket, s.control} {
		if _, err := os.Lstat(sock); err == nil {
			t.Errorf("%s left behind after a clean stop", sock)
		}
	}
	cache := filepath.Join(s.dataDir, "cache.img")
	out, err := wb(t, true, "check", "--cache", cache)
	if err != nil {
		t.Fatalf("check after a clean stop failed: %v\n%s", err, out)
	}
	if !strings.Contains(out, "clean shutdown: yes") {
		t.Errorf("check does not report a clean shutdown:\n%s", out)
	}

	checkCorruptCopy(t, cache)

	// Restart: everything written, drained or not, reads back.
	s = startServe(t, dir)
	run(t, time.Minute, false, "qemu-io", "-f", "raw", s.uri,
		"-c", "read -P 0xa5 1M 8M", "-c", "read -P 0x5a 100M 512k", "-c", "read -P 0x3c 200M 4M", "-c", "read -P 0 300M 1M")
	if code := s.stop(syscall.SIGINT); code != 0 {
		t.Fatalf("serve exited %d after SIGINT", code)
	}
}

// TestServeRefusesForeignCache: a cache image holding other data is not
// touched without --reformat.
func TestServeRefusesForeignCache(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "writeboost-data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		t.Fatal(err)
	}
	foreign := make([]byte, 64<<20)
	for i := range foreign {
		foreign[i] = byte(i*7 + 1)
	}
	cache := filepath.Join(data, "cache.img")
	if err := os.WriteFile(cache, foreign, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "backing.img"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(data, "backing.img"), 256<<20); err != nil {
		t.Fatal(err)
	}
	cmdOut, err := runIn(t, dir, binary(t), "serve")
	if err == nil {
		t.Fatalf("serve accepted a foreign cache:\n%s", cmdOut)
	}
	if !strings.Contains(cmdOut, "--reformat") || !strings.Contains(cmdOut, "cache.img") {
		t.Errorf("refusal does not name the cache and the way out:\n%s", cmdOut)
	}
	got, _ := os.ReadFile(cache)
	if string(got) != string(foreign) {
		t.Fatal("serve modified a foreign cache image it refused")
	}

	// --reformat takes it over.
	s := startServe(t, dir, "--reformat")
	if code := s.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("serve --reformat exited %d", code)
	}
}

func status(t *testing.T, s *server) map[string]any {
	t.Helper()
	out, _ := wb(t, false, "status", "--json", "--control", s.control)
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return m
}

// checkCorruptCopy flips one byte of a live segment's data in a copy of
// cache and expects `writeboost check` to exit 1 naming that segment.
func checkCorruptCopy(t *testing.T, cache string) {
	t.Helper()
	out, _ := wb(t, false, "check", "--json", "--cache", cache)
	var rep struct {
		Live []struct {
			ID     uint64 `json:"id"`
			Offset int64  `json:"offset"`
			Count  int    `json:"count"`
		} `json:"live_segments"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || len(rep.Live) == 0 {
		t.Fatalf("check --json: %v\n%s", err, out)
	}
	victim := rep.Live[len(rep.Live)-1]
	bad := filepath.Join(t.TempDir(), "bad.img")
	run(t, time.Minute, false, "cp", "--sparse=always", cache, bad)
	f, err := os.OpenFile(bad, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	off := victim.Offset + 4096 + 1234 // in the first data block
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 1
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err = wb(t, true, "check", "--cache", bad)
	if exitCode(err) != 1 {
		t.Fatalf("check of a corrupted cache: exit %d, want 1\n%s", exitCode(err), out)
	}
	if want := fmt.Sprintf("segment %d ", victim.ID); !strings.Contains(out, want) {
		t.Errorf("check output does not name %q:\n%s", want, out)
	}
}
