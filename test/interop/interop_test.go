// Package interop checks pkg/nbd against real NBD clients: libnbd's
// nbdinfo and nbdcopy, qemu-img, fio's nbd engine and python3-libnbd. The
// server runs in-process on a unix socket over a RAM backend; each test
// skips (or fails in CI, see testenv) when its client is not installed.
package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// noCache is a backend that advertises no write cache at all.
type noCache struct{ m *nbd.MemBackend }

func (n noCache) ReadAt(p []byte, off int64) (int, error)  { return n.m.ReadAt(p, off) }
func (n noCache) WriteAt(p []byte, off int64) (int, error) { return n.m.WriteAt(p, off) }
func (n noCache) Size() int64                              { return n.m.Size() }

type served struct {
	sock string
	mem  *nbd.MemBackend
}

// uri returns the NBD URI of an export on the test server.
func (s served) uri(export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, s.sock)
}

// serve starts a server with exports "" (RAM, size bytes), "ro" (the same
// RAM, read-only) and "nocache" (a backend without Flush, Trim, Zero).
func serve(t *testing.T, size int64) served {
	t.Helper()
	mem := nbd.NewMemBackend(size)
	s := nbd.NewServer(nbd.Config{})
	for _, e := range []nbd.Export{
		{Name: "", Description: "writeboost interop RAM disk", Backend: mem},
		{Name: "ro", Backend: mem, ReadOnly: true},
		{Name: "nocache", Backend: noCache{nbd.NewMemBackend(1 << 20)}},
	} {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	// Unix socket paths are limited to 108 bytes: keep it short.
	dir, err := os.MkdirTemp("", "nbdi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	l, err := nbd.ListenUnix(sock, 0)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	})
	return served{sock: sock, mem: mem}
}

func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out
}

func randomFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "random.img")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, data
}

func TestNbdinfo(t *testing.T) {
	testenv.RequireTools(t, "nbdinfo")
	s := serve(t, 64<<20)

	type export struct {
		Name        string `json:"export-name"`
		Description string `json:"description"`
		Size        int64  `json:"export-size"`
		ReadOnly    bool   `json:"is_read_only"`
		Rotational  bool   `json:"is_rotational"`
		CanFlush    bool   `json:"can_flush"`
		CanFUA      bool   `json:"can_fua"`
		CanTrim     bool   `json:"can_trim"`
		CanZero     bool   `json:"can_zero"`
		CanMulti    bool   `json:"can_multi_conn"`
		CanCache    bool   `json:"can_cache"`
		MinBS       int    `json:"block_size_minimum"`
		PrefBS      int    `json:"block_size_preferred"`
		MaxBS       int    `json:"block_size_maximum"`
	}
	info := func(args ...string) []export {
		var out struct {
			Protocol string   `json:"protocol"`
			Exports  []export `json:"exports"`
		}
		if err := json.Unmarshal(run(t, "nbdinfo", append([]string{"--json"}, args...)...), &out); err != nil {
			t.Fatal(err)
		}
		if out.Protocol != "newstyle-fixed" {
			t.Errorf("protocol %q", out.Protocol)
		}
		return out.Exports
	}

	got := info(s.uri(""))
	want := export{Description: "writeboost interop RAM disk", Size: 64 << 20, CanFlush: true, CanFUA: true,
		CanTrim: true, CanZero: true, CanMulti: true, MinBS: 512, PrefBS: 4096, MaxBS: 32 << 20}
	if len(got) != 1 || got[0] != want {
		t.Errorf("default export:\n got %+v\nwant %+v", got, want)
	}
	got = info(s.uri("ro"))
	if len(got) != 1 || !got[0].ReadOnly || got[0].CanTrim || got[0].CanZero || got[0].CanFUA {
		t.Errorf("read-only export: %+v", got)
	}
	got = info(s.uri("nocache"))
	if len(got) != 1 || got[0].CanFlush || got[0].CanFUA || got[0].CanTrim || got[0].CanZero || got[0].CanMulti {
		t.Errorf("export without capabilities: %+v", got)
	}
	names := map[string]bool{}
	for _, e := range info("--list", s.uri("")) {
		names[e.Name] = true
	}
	if !names[""] || !names["ro"] || !names["nocache"] || len(names) != 3 {
		t.Errorf("nbdinfo --list: %v", names)
	}
	// An unknown export is refused cleanly.
	cmd := exec.Command("nbdinfo", s.uri("missing"))
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("nbdinfo on a missing export succeeded: %s", out)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	testenv.RequireTools(t, "nbdcopy")
	const size = 32 << 20
	s := serve(t, size)
	src, data := randomFile(t, size)
	// nbdcopy uses several connections and many requests in flight.
	run(t, "nbdcopy", "--connections=4", "--requests=32", src, s.uri(""))
	back := filepath.Join(t.TempDir(), "back.img")
	run(t, "nbdcopy", s.uri(""), back)
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy round trip differs")
	}
	mem := make([]byte, size)
	if _, err := s.mem.ReadAt(mem, 0); err != nil || !bytes.Equal(mem, data) {
		t.Fatal("backend content differs from what was copied in")
	}
}

func TestQemuImgCompare(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	const size = 16 << 20
	s := serve(t, size)
	src, _ := randomFile(t, size)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri(""))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri(""))
	// And a difference is noticed.
	if _, err := s.mem.WriteAt([]byte{1}, size/2); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri("")).CombinedOutput(); err == nil {
		t.Fatalf("qemu-img compare missed a changed byte: %s", out)
	}
}

func TestFioVerify(t *testing.T) {
	testenv.RequireTools(t, "fio")
	s := serve(t, 128<<20)
	for _, job := range [][]string{
		{"--rw=randwrite", "--bs=4k", "--iodepth=32"},
		{"--rw=randwrite", "--bsrange=512-128k", "--iodepth=16"},
		{"--rw=write", "--bs=1m", "--iodepth=8"},
	} {
		args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + s.uri(""), "--size=64m",
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
			"--randrepeat=0", "--output-format=json"}, job...)
		out := run(t, "fio", args...)
		var res struct {
			Jobs []struct {
				Error int `json:"error"`
				Write struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"write"`
				Read struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"read"`
			} `json:"jobs"`
		}
		if i := bytes.IndexByte(out, '{'); i > 0 {
			out = out[i:] // the nbd engine may print before the JSON
		}
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("fio output: %v\n%s", err, out)
		}
		if len(res.Jobs) != 1 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOBytes < 64<<20 || res.Jobs[0].Read.IOBytes < 64<<20 {
			t.Errorf("fio %v: %+v", job, res.Jobs)
		}
	}
}

// python3 returns an interpreter that has the libnbd bindings (Debian
// installs them for the system python, which may not be first on PATH).
func python3(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(p, "-c", "import nbd").Run() == nil {
			return p
		}
	}
	testenv.Skipf(t, "no python3 with the nbd module (python3-libnbd)")
	return ""
}

func TestLibnbdSemantics(t *testing.T) {
	py := python3(t)
	s := serve(t, 64<<20)
	out := run(t, py, "testdata/libnbd_semantics.py", s.uri(""), s.uri("ro"))
	if strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("script output: %s", out)
	}
}
