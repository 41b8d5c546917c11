package membudget

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReserve(t *testing.T) {
	b := New(1000)
	if err := b.Reserve("a", 600); err != nil {
		t.Fatal(err)
	}
	if err := b.Reserve("a", 600); err != nil {
		t.Fatalf("a retried stage counts once: %v", err)
	}
	err := b.Reserve("b", 500)
	var ex *ExhaustedError
	if !errors.As(err, &ex) || !errors.Is(err, ErrExhausted) {
		t.Fatalf("over budget: %v", err)
	}
	if ex.Need != 500 || ex.InUse != 600 || ex.Budget != 1000 || ex.Volume != "b" {
		t.Fatalf("figures %+v", ex)
	}
	for _, s := range []string{"volume b", "500 B", "600 B", "1000 B"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%q does not name %q", err, s)
		}
	}
	if err := b.Reserve("b", 400); err != nil {
		t.Fatalf("exactly full: %v", err)
	}
	b.Release("a")
	if b.InUse() != 400 {
		t.Fatalf("in use %d", b.InUse())
	}
	if over := b.Force("c", 700); !over {
		t.Fatal("forced past the budget not reported")
	}
	if err := b.Commit("d", 1, 1000); err == nil {
		t.Fatal("commit over budget accepted")
	}
	if err := b.Commit("d", 1, 999); err != nil {
		t.Fatal(err)
	}
}

func TestNeed(t *testing.T) {
	m, need, err := Need(10<<30, 0)
	if err != nil {
		t.Fatal(err)
	}
	blocks := float64(10<<30) / 4096
	if per := float64(m.Index) / blocks; per < 12.5 || per > 13.5 {
		t.Fatalf("index %.2f bytes per block", per)
	}
	if need != m.Total()+RequestBytes() || m.Scratch < 16<<20 || m.Buffers < 2<<20 {
		t.Fatalf("need %d for %+v", need, m)
	}
	if _, _, err := Need(17<<40, 0); err == nil {
		t.Fatal("a 17 TiB cache slice was given a figure")
	}
}

func writeFiles(t *testing.T, root string, files map[string]string) {
	for p, s := range files {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestDefaultLimit(t *testing.T) {
	meminfo := "MemTotal:       16384000 kB\nMemFree: 1 kB\n"
	for _, c := range []struct {
		name  string
		files map[string]string
		want  int64
	}{
		{"v2 in a container", map[string]string{"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "4294967296\n", "proc/meminfo": meminfo}, 4<<30 - 256<<20},
		{"v1 in a container", map[string]string{"proc/self/cgroup": "4:memory:/kubepods/pod1/c1\n0::/\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "4294967296\n", "sys/fs/cgroup/memory.max": "max\n", "proc/meminfo": meminfo}, 4<<30 - 256<<20},
		{"v1 on the host", map[string]string{"proc/self/cgroup": "4:memory:/kubepods/pod1/c1\n",
			"sys/fs/cgroup/memory/kubepods/pod1/c1/memory.limit_in_bytes": "268435456\n", "proc/meminfo": meminfo}, 128 << 20},
		{"unlimited", map[string]string{"proc/self/cgroup": "4:memory:/\n0::/\n", "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
			"sys/fs/cgroup/memory.max": "max\n", "proc/meminfo": meminfo}, 16384000 << 10 / 2},
	} {
		root := t.TempDir() + "/"
		writeFiles(t, root, c.files)
		got, src := defaultLimit(root)
		if got != c.want {
			t.Errorf("%s: %d (%s), want %d", c.name, got, src, c.want)
		}
	}
}
