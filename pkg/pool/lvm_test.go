package pool

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// fakeLVM is a scripted volume group answering like the lvm tools.
type fakeLVM struct {
	free  int64
	lvs   map[string]int64
	calls []string
}

func (f *fakeLVM) run(_ context.Context, name string, args ...string) ([]byte, error) {
	f.calls = append(f.calls, name+" "+strings.Join(args, " "))
	last := args[len(args)-1]
	size := func() int64 {
		for i, a := range args {
			if a == "--size" {
				n, _ := strconv.ParseInt(strings.TrimSuffix(args[i+1], "b"), 10, 64)
				return (n + 4<<20 - 1) / (4 << 20) * (4 << 20) // 4 MiB extents
			}
		}
		return 0
	}
	switch name {
	case "vgs":
		return []byte(fmt.Sprintf("  %d\n", f.free)), nil
	case "lvs":
		n, ok := f.lvs[last]
		if !ok {
			return nil, fmt.Errorf("lvs: exit status 5: Failed to find logical volume %q", last)
		}
		return []byte(fmt.Sprintf("  %d\n", n)), nil
	case "lvcreate":
		n := size()
		if n > f.free {
			return nil, errors.New("lvcreate: Volume group \"vg\" has insufficient free space")
		}
		var lvName string
		for i, a := range args {
			if a == "--name" {
				lvName = args[i+1]
			}
		}
		f.lvs[last+"/"+lvName] = n
		f.free -= n
		return nil, nil
	case "lvextend":
		n := size()
		if n-f.lvs[last] > f.free {
			return nil, errors.New("lvextend: insufficient free space")
		}
		f.free -= n - f.lvs[last]
		f.lvs[last] = n
		return nil, nil
	case "lvremove":
		f.free += f.lvs[last]
		delete(f.lvs, last)
		return nil, nil
	}
	return nil, fmt.Errorf("unexpected %s", name)
}

func TestLVMPool(t *testing.T) {
	f := &fakeLVM{free: 100 << 20, lvs: map[string]int64{}}
	zeroed := map[string]int64{}
	p := &LVM{VG: "vg", Run: f.run, ZeroHead: func(path string, n int64) error { zeroed[path] = n; return nil }}
	path, err := p.Create("v1", 10<<20)
	if err != nil || path != "/dev/vg/v1" {
		t.Fatalf("create: %q %v", path, err)
	}
	if zeroed["/dev/vg/v1"] != 1<<20 {
		t.Fatalf("head of the new volume not zeroed: %v", zeroed)
	}
	if _, err := p.Create("v1", 10<<20); err != nil {
		t.Fatalf("idempotent create (rounded to 12 MiB): %v", err)
	}
	if _, err := p.Create("v1", 100<<20); !errors.Is(err, ErrSizeClash) {
		t.Fatalf("size clash: %v", err)
	}
	if c, _ := p.Capacity(); c != 88<<20 {
		t.Fatalf("capacity %d", c)
	}
	if _, err := p.Create("v2", 200<<20); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("full: %v", err)
	}
	if err := p.Expand("v1", 20<<20); err != nil {
		t.Fatal(err)
	}
	if _, n, _ := p.Lookup("v1"); n != 20<<20 {
		t.Fatalf("after expand %d", n)
	}
	if err := p.Expand("v1", 500<<20); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("expand beyond: %v", err)
	}
	if err := p.Delete("v1"); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("v1"); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if _, _, err := p.Lookup("v1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lookup deleted: %v", err)
	}
	if c, _ := p.Capacity(); c != 100<<20 {
		t.Fatalf("capacity not returned: %d", c)
	}
	if _, err := p.Create("../x", 4096); err == nil {
		t.Fatal("bad name accepted")
	}
	want := "lvcreate --yes --wipesignatures y --zero y --name v1 --size 10485760b vg"
	found := false
	for _, c := range f.calls {
		found = found || c == want
	}
	if !found {
		t.Fatalf("no %q in %q", want, f.calls)
	}
}
