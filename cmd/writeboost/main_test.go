package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"4GiB": 4 << 30, "4G": 4 << 30, "4g": 4 << 30, "512Mi": 512 << 20, "512MB": 512 << 20,
		"1T": 1 << 40, "65536": 65536, "1.5G": 3 << 29, "64k": 64 << 10,
	} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "G", "-1G", "four", "1Q", "1e30T"} {
		if n, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", bad, n)
		}
	}
	var n int64 = 3 << 30
	if s := (sizeValue{&n}).String(); s != "3GiB" {
		t.Errorf("sizeValue.String() = %q", s)
	}
}

func TestTunableFlagsCoverEverySpec(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	tf := addTunableFlags(fs)
	for _, s := range engine.TunableSpecs {
		if fs.Lookup(tunableFlagName(s.Name)) == nil {
			t.Errorf("no flag for tunable %s", s.Name)
		}
	}
	// The spellings.
	for _, name := range []string{"writeback-threshold", "nr-max-batched-writeback", "update-sb-record-interval",
		"sync-data-interval", "read-cache-threshold", "write-around"} {
		if fs.Lookup(name) == nil {
			t.Errorf("no --%s flag", name)
		}
	}
	got, err := tf.tunables()
	if err != nil || got != engine.DefaultTunables() {
		t.Fatalf("defaults: %+v, %v; want %+v", got, err, engine.DefaultTunables())
	}
	if err := fs.Parse([]string{"--writeback-threshold=10", "--write-around", "--read-cache-threshold=5"}); err != nil {
		t.Fatal(err)
	}
	got, err = tf.tunables()
	if err != nil || got.WritebackThreshold != 10 || !got.WriteAroundMode || got.ReadCacheThreshold != 5 {
		t.Fatalf("parsed: %+v, %v", got, err)
	}
	if err := fs.Parse([]string{"--nr-max-batched-writeback=0"}); err != nil {
		t.Fatal(err)
	}
	if _, err := tf.tunables(); err == nil || !strings.Contains(err.Error(), "--nr-max-batched-writeback") {
		t.Fatalf("out-of-range flag: err = %v, want one naming the flag", err)
	}
}

func TestNBDURI(t *testing.T) {
	if got := nbdURI("/tmp/x y/nbd.sock", ""); got != "nbd+unix:///?socket=/tmp/x%20y/nbd.sock" {
		t.Errorf("nbdURI = %q", got)
	}
	if got := nbdURI("/run/a.sock", "vol1"); got != "nbd+unix:///vol1?socket=/run/a.sock" {
		t.Errorf("nbdURI = %q", got)
	}
}

func TestEnsureImageIsSparseAndKeepsExisting(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d", "img")
	created, err := ensureImage(p, 1<<30)
	if err != nil || !created {
		t.Fatalf("ensureImage: %v %v", created, err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Size() != 1<<30 {
		t.Fatalf("stat: %v %v", st, err)
	}
	if err := os.WriteFile(p, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	created, err = ensureImage(p, 1<<30)
	if err != nil || created {
		t.Fatalf("second ensureImage: %v %v", created, err)
	}
	if b, _ := os.ReadFile(p); string(b) != "keep" {
		t.Fatal("ensureImage touched an existing image")
	}
	if _, err := ensureImage("/dev/writeboost-no-such-disk", 1<<30); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("ensureImage under /dev: %v", err)
	}
	if _, err := ensureImage(filepath.Join(t.TempDir(), "odd"), 1000); err == nil {
		t.Fatal("ensureImage accepted a size that is not a multiple of 4096")
	}
}

func TestDefaultBufferPathIsStablePerCache(t *testing.T) {
	dir := t.TempDir()
	a, err := defaultBufferPath(filepath.Join(dir, "cache.img"), dir)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := defaultBufferPath(filepath.Join(dir, ".", "cache.img"), dir)
	c, _ := defaultBufferPath(filepath.Join(dir, "other.img"), dir)
	if a != b || a == c {
		t.Fatalf("buffer paths: same cache %q vs %q, other cache %q", a, b, c)
	}
}

func TestHelpListsCommands(t *testing.T) {
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"serve", "status", "set", "drain", "clear-stat", "check", "dump"} {
		if !strings.Contains(out.String(), "\n  "+c+" ") {
			t.Errorf("help lacks %q:\n%s", c, out.String())
		}
	}
	root = newRootCommand()
	out.Reset()
	root.SetOut(&out)
	root.SetArgs([]string{"version"})
	if err := root.Execute(); err != nil || strings.TrimSpace(out.String()) != version {
		t.Fatalf("version: %q %v", out.String(), err)
	}
}

func TestProgressRendering(t *testing.T) {
	if got := renderBar(5, 10, "blocks", 10); got != "[#####.....]  50.0%  5/10 blocks" {
		t.Errorf("renderBar = %q", got)
	}
	if got := renderBar(12, 10, "blocks", 4); got != "[####] 100.0%  10/10 blocks" {
		t.Errorf("renderBar past the end = %q", got)
	}
	if got := renderCounts(7, 0, "blocks"); got != "7 blocks" {
		t.Errorf("renderCounts with unknown total = %q", got)
	}
	// Not a terminal: plain lines, the first at once, then rate-limited.
	var out bytes.Buffer
	b := newProgressBar(&out, "blocks")
	b.update(1, 10)
	b.update(2, 10)
	b.finish()
	if out.String() != "10.0%  1/10 blocks\n" {
		t.Errorf("plain progress = %q", out.String())
	}
}
