package pool

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeVG is a scripted volume group answering like the lvm tools, with
// extents that keep their bytes when an LV goes away, as real ones do: an
// LV gets the lowest free extents, whatever they hold.
type fakeVG struct {
	mu     sync.Mutex
	ext    int64 // extent size
	data   [][]byte
	owner  []string // extent -> LV, "" = free
	lvs    map[string]*fakeLV
	vgTags []string
	calls  []string
	// dirtyAllocs counts volumes given an extent that did not read as
	// zeros (wipe LVs excepted: they exist to hold such extents).
	dirtyAllocs []string
	// ops counts runner and zero calls; from op crashAt on, every call
	// fails as if the process had died (-1: never).
	ops, crashAt int
}

type fakeLV struct {
	exts []int
	tags []string
}

var errCrash = errors.New("crashed")

func newFakeVG(extents int, ext int64, garbage byte) *fakeVG {
	f := &fakeVG{ext: ext, lvs: map[string]*fakeLV{}, crashAt: -1}
	for i := 0; i < extents; i++ {
		b := make([]byte, ext)
		if garbage != 0 {
			for j := range b {
				b[j] = garbage
			}
		}
		f.data = append(f.data, b)
		f.owner = append(f.owner, "")
	}
	return f
}

func (f *fakeVG) free() int64 {
	n := int64(0)
	for _, o := range f.owner {
		if o == "" {
			n += f.ext
		}
	}
	return n
}

func (f *fakeVG) opLocked() error {
	f.ops++
	if f.crashAt >= 0 && f.ops > f.crashAt {
		return errCrash
	}
	return nil
}

func (f *fakeVG) alloc(name string, n int, check bool) error {
	var got []int
	for i, o := range f.owner {
		if len(got) == n {
			break
		}
		if o == "" {
			got = append(got, i)
		}
	}
	if len(got) < n {
		return errors.New(`Volume group "vg" has insufficient free space`)
	}
	for _, e := range got {
		f.owner[e] = name
		if check && !allZero(f.data[e]) {
			f.dirtyAllocs = append(f.dirtyAllocs, fmt.Sprintf("%s got extent %d", name, e))
		}
	}
	lv := f.lvs[name]
	if lv == nil {
		lv = &fakeLV{}
		f.lvs[name] = lv
	}
	lv.exts = append(lv.exts, got...)
	return nil
}

func argAfter(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func (f *fakeVG) run(_ context.Context, name string, args ...string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.opLocked(); err != nil {
		return nil, err
	}
	f.calls = append(f.calls, name+" "+strings.Join(args, " "))
	last := args[len(args)-1]
	lvName := strings.TrimPrefix(last, "vg/")
	extents := func(size string) int {
		n, _ := strconv.ParseInt(strings.TrimSuffix(size, "b"), 10, 64)
		return int((n + f.ext - 1) / f.ext)
	}
	switch name {
	case "vgs":
		switch argAfter(args, "-o") {
		case "vg_free":
			return []byte(fmt.Sprintf("  %d\n", f.free())), nil
		case "vg_extent_size":
			return []byte(fmt.Sprintf("  %d\n", f.ext)), nil
		case "vg_free,vg_tags":
			return []byte(fmt.Sprintf("  %d|%s\n", f.free(), strings.Join(f.vgTags, ","))), nil
		}
	case "vgchange":
		f.vgTags = append(f.vgTags, argAfter(args, "--addtag"))
		return nil, nil
	case "lvs":
		if argAfter(args, "-o") == "lv_name,lv_size" {
			var b strings.Builder
			names := make([]string, 0, len(f.lvs))
			for n := range f.lvs {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				fmt.Fprintf(&b, "  %s|%d\n", n, int64(len(f.lvs[n].exts))*f.ext)
			}
			return []byte(b.String()), nil
		}
		lv, ok := f.lvs[lvName]
		if !ok {
			return nil, fmt.Errorf("lvs: exit status 5: Failed to find logical volume %q", last)
		}
		return []byte(fmt.Sprintf("  %d|%s\n", int64(len(lv.exts))*f.ext, strings.Join(lv.tags, ","))), nil
	case "lvcreate":
		n := argAfter(args, "--name")
		if _, ok := f.lvs[n]; ok {
			return nil, fmt.Errorf("lvcreate: Logical Volume %q already exists in volume group", n)
		}
		var err error
		if argAfter(args, "--extents") == "100%FREE" {
			err = f.alloc(n, int(f.free()/f.ext), false)
		} else {
			err = f.alloc(n, extents(argAfter(args, "--size")), !strings.HasPrefix(n, wipePrefix))
		}
		if err != nil {
			return nil, err
		}
		if t := argAfter(args, "--addtag"); t != "" {
			f.lvs[n].tags = append(f.lvs[n].tags, t)
		}
		if argAfter(args, "--zero") == "y" {
			clear(f.data[f.lvs[n].exts[0]][:4096])
		}
		return nil, nil
	case "lvchange":
		lv := f.lvs[lvName]
		t := argAfter(args, "--deltag")
		lv.tags = withoutTag(lv.tags, t)
		return nil, nil
	case "lvextend":
		lv := f.lvs[lvName]
		more := extents(argAfter(args, "--size")) - len(lv.exts)
		if more > 0 {
			if err := f.alloc(lvName, more, true); err != nil {
				return nil, errors.New("lvextend: insufficient free space")
			}
		}
		return nil, nil
	case "lvreduce":
		lv := f.lvs[lvName]
		keep := extents(argAfter(args, "--size"))
		for _, e := range lv.exts[keep:] {
			f.owner[e] = ""
		}
		lv.exts = lv.exts[:keep]
		return nil, nil
	case "lvrename":
		from, to := args[1], args[2]
		lv := f.lvs[from]
		delete(f.lvs, from)
		f.lvs[to] = lv
		for _, e := range lv.exts {
			f.owner[e] = to
		}
		return nil, nil
	case "lvremove":
		for _, e := range f.lvs[lvName].exts {
			f.owner[e] = ""
		}
		delete(f.lvs, lvName)
		return nil, nil
	}
	return nil, fmt.Errorf("unexpected %s %v", name, args)
}

func withoutTag(tags []string, t string) []string {
	var out []string
	for _, x := range tags {
		if x != t {
			out = append(out, x)
		}
	}
	return out
}

// lvOf maps a device path to its LV.
func (f *fakeVG) lvOf(path string) (string, *fakeLV, error) {
	name := strings.TrimPrefix(path, "/dev/vg/")
	lv, ok := f.lvs[name]
	if !ok {
		return "", nil, fmt.Errorf("%s: no such device", path)
	}
	return name, lv, nil
}

// rw applies fn to the bytes [off, off+n) of an LV, extent by extent.
func (f *fakeVG) rw(lv *fakeLV, off, n int64, fn func(b []byte, at int64)) {
	for n > 0 {
		e, o := off/f.ext, off%f.ext
		k := min(n, f.ext-o)
		fn(f.data[lv.exts[e]][o:o+k], off)
		off += k
		n -= k
	}
}

func (f *fakeVG) zero(path string, off, n int64) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.opLocked(); err != nil {
		return "", err
	}
	_, lv, err := f.lvOf(path)
	if err != nil {
		return "", err
	}
	if off < 0 || off+n > int64(len(lv.exts))*f.ext {
		return "", fmt.Errorf("zero %s beyond its end", path)
	}
	f.rw(lv, off, n, func(b []byte, _ int64) { clear(b) })
	return ZeroOffload, nil
}

// fill writes the byte c over a whole LV (a tenant's data).
func (f *fakeVG) fill(path string, c byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, lv, err := f.lvOf(path)
	if err != nil {
		panic(err)
	}
	f.rw(lv, 0, int64(len(lv.exts))*f.ext, func(b []byte, _ int64) {
		for i := range b {
			b[i] = c
		}
	})
}

// firstNonZero returns the offset of the first non-zero byte of an LV, or -1.
func (f *fakeVG) firstNonZero(path string) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, lv, err := f.lvOf(path)
	if err != nil {
		panic(err)
	}
	at := int64(-1)
	f.rw(lv, 0, int64(len(lv.exts))*f.ext, func(b []byte, off int64) {
		if at < 0 && !allZero(b) {
			for i, c := range b {
				if c != 0 {
					at = off + int64(i)
					break
				}
			}
		}
	})
	return at
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// freeDirty lists free extents that do not read as zeros.
func (f *fakeVG) freeDirty() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []int
	for i, o := range f.owner {
		if o == "" && !allZero(f.data[i]) {
			out = append(out, i)
		}
	}
	return out
}

func (f *fakeVG) pool(zeroFree bool) *LVM {
	return &LVM{VG: "vg", Run: f.run, Zero: f.zero, ZeroFreeSpace: zeroFree, WipeChunk: 2 * f.ext}
}

func TestLVMPool(t *testing.T) {
	f := newFakeVG(25, 4<<20, 0)
	p := f.pool(false)
	path, err := p.Create("v1", 10<<20)
	if err != nil || path != "/dev/vg/v1" {
		t.Fatalf("create: %q %v", path, err)
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
	if c, _ := p.Capacity(); c != 80<<20 {
		t.Fatalf("capacity counts the volume being wiped: %d", c)
	}
	if got := p.WipePending(); got != 20<<20 {
		t.Fatalf("%d bytes pending for the wiper, want %d", got, 20<<20)
	}
	if err := p.wipeAll(context.Background()); err != nil {
		t.Fatal(err)
	}
	if c, _ := p.Capacity(); c != 100<<20 {
		t.Fatalf("capacity not returned after the wipe: %d", c)
	}
	if _, err := p.Create("../x", 4096); err == nil {
		t.Fatal("bad name accepted")
	}
	want := "lvcreate --yes --wipesignatures y --zero y --addtag writeboost_pending --name v1 --size 10485760b vg"
	found := false
	for _, c := range f.calls {
		found = found || c == want
	}
	if !found {
		t.Fatalf("no %q in %q", want, f.calls)
	}
}

// TestLVMNoPreviousTenantData: a volume created on the extents of a
// deleted one, or of whatever the disks held before, reads as zeros from
// its first byte to its last, and so does its extension. Before the pool
// wiped released space, only the first MiB was zeroed.
func TestLVMNoPreviousTenantData(t *testing.T) {
	f := newFakeVG(32, 1<<20, 0xEE) // disks that held something before
	p := f.pool(true)
	p.StartWiper()
	defer p.Close()
	waitWiped := func() {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			f.mu.Lock()
			left := 0
			for n := range f.lvs {
				if strings.HasPrefix(n, wipePrefix) {
					left++
				}
			}
			f.mu.Unlock()
			if left == 0 && p.WipePending() == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("wipe did not finish: %d wipe LVs, %d bytes pending, %v", left, p.WipePending(), p.WipeStatus().Err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// The first Create adopts the group: its free space goes to the wiper.
	a, err := p.Create("a", 8<<20)
	if !errors.Is(err, ErrNoSpace) {
		// The wiper may already have returned a chunk or more: fine, as
		// long as what a got reads as zeros (checked below).
		if err != nil {
			t.Fatal(err)
		}
	}
	waitWiped()
	if err != nil {
		if a, err = p.Create("a", 8<<20); err != nil {
			t.Fatal(err)
		}
	}
	if at := f.firstNonZero(a); at >= 0 {
		t.Fatalf("new volume a shows old data at byte %d", at)
	}
	f.fill(a, 0xAA) // tenant a's data
	if err := p.Delete("a"); err != nil {
		t.Fatal(err)
	}
	waitWiped()
	if c, _ := p.Capacity(); c != 32<<20 {
		t.Fatalf("capacity after the wipe %d, want %d", c, 32<<20)
	}
	b, err := p.Create("b", 12<<20)
	if err != nil {
		t.Fatal(err)
	}
	if at := f.firstNonZero(b); at >= 0 {
		t.Fatalf("new volume b shows tenant a's data at byte %d", at)
	}
	if err := p.Expand("b", 20<<20); err != nil {
		t.Fatal(err)
	}
	if at := f.firstNonZero(b); at >= 0 {
		t.Fatalf("expanded volume b shows old data at byte %d", at)
	}
	if len(f.dirtyAllocs) > 0 {
		t.Fatalf("volumes got extents holding old data: %v", f.dirtyAllocs)
	}
	if st := p.WipeStatus(); st.WipedBytes != 32<<20+8<<20 || st.Err != nil {
		t.Fatalf("wipe status %+v, want %d bytes wiped", st, 40<<20)
	}
}

// TestLVMCrashSweep crashes the plugin at every lvm command and every
// zeroing of a scenario (adopt, create, write, delete, create again, with
// wipes in between), restarts it and retries the step that failed, as the
// CSI sidecars do. A volume is never handed out holding old data, no
// volume ever gets a dirty extent, and at the end every free extent reads
// as zeros and all space is accounted for.
func TestLVMCrashSweep(t *testing.T) {
	for k := 0; ; k++ {
		f := newFakeVG(64, 64<<10, 0xEE)
		f.crashAt = k
		pool := func() *LVM { p := f.pool(true); p.WipeChunk = 512 << 10; return p }
		p := pool()
		var paths = map[string]string{}
		steps := []struct {
			name string
			do   func(p *LVM) error
		}{
			{"wipe", func(p *LVM) error { return p.wipeAll(context.Background()) }},
			{"create a", func(p *LVM) (err error) { paths["a"], err = p.Create("a", 1536<<10); return }},
			{"use a", func(p *LVM) error {
				path, _, err := p.Lookup("a")
				if err == nil {
					if at := f.firstNonZero(path); at >= 0 {
						t.Fatalf("crash at op %d: a handed out with old data at byte %d", k, at)
					}
					f.fill(path, 0xAA)
				}
				return err
			}},
			{"delete a", func(p *LVM) error { return p.Delete("a") }},
			{"create b", func(p *LVM) (err error) { paths["b"], err = p.Create("b", 2<<20); return }},
			{"wipe", func(p *LVM) error { return p.wipeAll(context.Background()) }},
		}
		crashed := false
		defer func() { f.crashAt = -1 }()
		for _, s := range steps {
			err := s.do(p)
			if err != nil && errors.Is(err, errCrash) {
				// Restart: a new process, the same disks.
				crashed = true
				f.mu.Lock()
				f.crashAt = -1
				f.mu.Unlock()
				p = pool()
				err = s.do(p)
			}
			if err != nil {
				t.Fatalf("crash at op %d: step %s after restart: %v", k, s.name, err)
			}
		}
		f.crashAt = -1
		if at := f.firstNonZero(paths["b"]); at >= 0 {
			t.Fatalf("crash at op %d: b shows old data at byte %d", k, at)
		}
		if len(f.dirtyAllocs) > 0 {
			t.Fatalf("crash at op %d: volumes got extents holding old data: %v", k, f.dirtyAllocs)
		}
		if d := f.freeDirty(); len(d) > 0 {
			t.Fatalf("crash at op %d: free extents hold old data: %v", k, d)
		}
		if c, _ := p.Capacity(); c != 2<<20 {
			t.Fatalf("crash at op %d: capacity %d, want %d; calls %s", k, c, 2<<20, strings.Join(f.calls, "\n"))
		}
		if !crashed {
			t.Logf("swept %d crash points", k)
			return
		}
	}
}

// TestLVMPendingNotHandedOut: a volume whose creation stopped between
// lvcreate and zeroing is not found by Lookup, and a retried Create zeroes
// it before handing it out. Before, the retry returned it as it was.
func TestLVMPendingNotHandedOut(t *testing.T) {
	f := newFakeVG(8, 1<<20, 0xEE)
	p := f.pool(false)
	p.Zero = func(string, int64, int64) (string, error) { return "", errors.New("killed") }
	if _, err := p.Create("v", 2<<20); err == nil {
		t.Fatal("create succeeded without zeroing")
	}
	if _, _, err := p.Lookup("v"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a volume still pending was handed out: %v", err)
	}
	p.Zero = f.zero
	path, err := p.Create("v", 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	if at := f.firstNonZero(path); at >= 0 && at < headBytes {
		t.Fatalf("retried create handed out old data at byte %d", at)
	}
	if _, _, err := p.Lookup("v"); err != nil {
		t.Fatal(err)
	}
}
