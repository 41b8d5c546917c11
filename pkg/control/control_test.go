package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// fakeTarget behaves like an engine as far as the control socket can see.
type fakeTarget struct {
	mu        sync.Mutex
	tunables  engine.Tunables
	dirty     uint64
	cleared   int
	flushErr  error
	flushes   int
	drainErr  error
	drainStep chan struct{} // when non-nil, each drain step waits for a token
	drainCtx  error         // ctx.Err() seen by the last drain that stopped early
	sets      []Setting
}

func newFake(dirty uint64) *fakeTarget {
	return &fakeTarget{tunables: engine.DefaultTunables(), dirty: dirty}
}

func (f *fakeTarget) Status() engine.Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	return engine.Status{NrDirtyCacheBlocks: f.dirty, LastWritebackID: 7, Tunables: f.tunables,
		Stat: engine.Counters{ReadHitCacheFull: uint64(10 * (1 - f.cleared))}}
}

func (f *fakeTarget) SetTunable(name, value string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s, ok := engine.LookupTunable(name); ok && !s.Online {
		return engine.ErrStaticTunable
	}
	if err := f.tunables.Set(name, value); err != nil {
		return err
	}
	f.sets = append(f.sets, Setting{name, value})
	return nil
}

func (f *fakeTarget) ClearStat() {
	f.mu.Lock()
	f.cleared = 1
	f.mu.Unlock()
}

func (f *fakeTarget) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.flushes++
	return f.flushErr
}

func (f *fakeTarget) Drain(ctx context.Context, progress func(engine.DrainProgress)) error {
	f.mu.Lock()
	initial := f.dirty
	step := f.drainStep
	f.mu.Unlock()
	for {
		f.mu.Lock()
		d := f.dirty
		f.mu.Unlock()
		progress(engine.DrainProgress{DirtyBlocks: d, InitialDirty: initial, WrittenBlocks: initial - d})
		if d == 0 {
			return f.drainErr
		}
		if step != nil {
			select {
			case <-step:
			case <-ctx.Done():
				f.mu.Lock()
				f.drainCtx = ctx.Err()
				f.mu.Unlock()
				return ctx.Err()
			}
		}
		f.mu.Lock()
		f.dirty--
		f.mu.Unlock()
	}
}

// serve starts a server for target on a socket in a temp dir.
func serve(t *testing.T, target Target) (*Server, *Client, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "control.sock")
	srv := NewServer(target)
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-errc; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	c := NewClient(path)
	t.Cleanup(c.Close)
	return srv, c, path
}

func TestStatusUsesDmWriteboostKeys(t *testing.T) {
	f := newFake(42)
	_, c, _ := serve(t, f)
	ctx := context.Background()
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.NrDirtyCacheBlocks != 42 || st.LastWritebackID != 7 || st.Tunables != engine.DefaultTunables() {
		t.Fatalf("status = %+v", st)
	}
	raw, err := c.StatusRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"nr_dirty_cache_blocks", "last_writeback_id", "current_id", "stat", "tunables"} {
		if _, ok := m[k]; !ok {
			t.Errorf("status JSON lacks key %q: %s", k, raw)
		}
	}
	if got := m["tunables"].(map[string]any)["writeback_threshold"]; got != float64(70) {
		t.Errorf("tunables.writeback_threshold = %v", got)
	}
}

func TestSetAppliesInOrderAndReturnsTunables(t *testing.T) {
	f := newFake(0)
	_, c, _ := serve(t, f)
	settings, err := ParseSettings([]string{"writeback_threshold=0", "nr-max-batched-writeback=4"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Set(context.Background(), settings)
	if err != nil {
		t.Fatal(err)
	}
	if got.WritebackThreshold != 0 || got.NrMaxBatchedWriteback != 4 {
		t.Fatalf("tunables after set = %+v", got)
	}
	want := []Setting{{"writeback_threshold", "0"}, {"nr_max_batched_writeback", "4"}}
	if fmt.Sprint(f.sets) != fmt.Sprint(want) {
		t.Fatalf("applied %v, want %v", f.sets, want)
	}
}

func TestSetRefusesBadInputAndChangesNothing(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"writeback_threshold=10", "no_such_knob=1"}, "no_such_knob"},
		{[]string{"writeback_threshold=10", "nr_max_batched_writeback=999"}, "out of range"},
		{[]string{"writeback_threshold=10", "read_cache_threshold=lots"}, "not an integer"},
		{[]string{"writeback_threshold=10", "write_around_mode=1"}, "write_around_mode"},
	} {
		t.Run(tc.args[1], func(t *testing.T) {
			f := newFake(0)
			_, c, _ := serve(t, f)
			settings, err := ParseSettings(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.Set(context.Background(), settings)
			var re *RemoteError
			if !errors.As(err, &re) || re.Code != 400 || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a 400 naming %q", err, tc.want)
			}
			if len(f.sets) != 0 {
				t.Fatalf("a refused set still applied %v", f.sets)
			}
		})
	}
	if _, err := ParseSettings([]string{"writeback_threshold"}); err == nil {
		t.Fatal("ParseSettings accepted an argument without '='")
	}
	if _, err := ParseSettings([]string{"=3"}); err == nil {
		t.Fatal("ParseSettings accepted an empty key")
	}
}

func TestDrainStreamsProgressUntilClean(t *testing.T) {
	f := newFake(5)
	_, c, _ := serve(t, f)
	var seen []engine.DrainProgress
	if err := c.Drain(context.Background(), func(p engine.DrainProgress) { seen = append(seen, p) }); err != nil {
		t.Fatal(err)
	}
	if len(seen) == 0 {
		t.Fatal("no progress reported")
	}
	last := seen[len(seen)-1]
	if last.DirtyBlocks != 0 || last.InitialDirty != 5 || last.WrittenBlocks != 5 {
		t.Fatalf("last progress = %+v, want all 5 written", last)
	}
	if st, _ := c.Status(context.Background()); st.NrDirtyCacheBlocks != 0 {
		t.Fatalf("dirty after drain = %d", st.NrDirtyCacheBlocks)
	}
}

func TestDrainErrorReachesClient(t *testing.T) {
	f := newFake(1)
	f.drainErr = fmt.Errorf("backing device: %w", engine.ErrIO)
	_, c, _ := serve(t, f)
	err := c.Drain(context.Background(), nil)
	if err == nil || !strings.Contains(err.Error(), "backing device") {
		t.Fatalf("err = %v, want the engine's error", err)
	}
}

func TestDrainStopsWhenClientGoes(t *testing.T) {
	f := newFake(3)
	f.drainStep = make(chan struct{})
	_, c, _ := serve(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan struct{})
	var once sync.Once
	errc := make(chan error, 1)
	go func() {
		errc <- c.Drain(ctx, func(engine.DrainProgress) { once.Do(func() { close(first) }) })
	}()
	<-first
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("client drain err = %v, want canceled", err)
	}
	waitFor(t, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return errors.Is(f.drainCtx, context.Canceled)
	})
}

func TestShutdownStopsRunningDrain(t *testing.T) {
	f := newFake(3)
	f.drainStep = make(chan struct{})
	srv, c, _ := serve(t, f)
	first := make(chan struct{})
	var once sync.Once
	errc := make(chan error, 1)
	go func() {
		errc <- c.Drain(context.Background(), func(engine.DrainProgress) { once.Do(func() { close(first) }) })
	}()
	<-first
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with a drain running: %v", err)
	}
	if err := <-errc; err == nil {
		t.Fatal("drain interrupted by shutdown reported success")
	}
}

func TestClearStatAndFlush(t *testing.T) {
	f := newFake(0)
	_, c, _ := serve(t, f)
	ctx := context.Background()
	if err := c.ClearStat(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := c.Status(ctx); st.Stat.ReadHitCacheFull != 0 {
		t.Fatalf("counters not cleared: %+v", st.Stat)
	}
	if err := c.Flush(ctx); err != nil || f.flushes != 1 {
		t.Fatalf("flush: err=%v flushes=%d", err, f.flushes)
	}
	f.mu.Lock()
	f.flushErr = fmt.Errorf("cache device: %w", engine.ErrIO)
	f.mu.Unlock()
	err := c.Flush(ctx)
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != 500 || !strings.Contains(err.Error(), "cache device") {
		t.Fatalf("flush err = %v, want a 500 with the cause", err)
	}
}

func TestSocketIsPrivate(t *testing.T) {
	_, _, path := serve(t, newFake(0))
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode = %v, want a socket with 0600", st.Mode())
	}
	// No temporary names are left behind next to it.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Fatalf("socket dir holds %d entries, want 1", len(ents))
	}
}

func TestListenReplacesStaleButNotLiveSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.sock")
	// A stale socket: bound, then the listener dies without unlinking.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	ln, err := Listen(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	// Now it is live: a second Listen must refuse.
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second Listen on a live socket: err = %v", err)
	}
	ln.Close()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket not removed on close: %v", err)
	}
	// A regular file is never removed.
	if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: err = %v", err)
	}
}

func TestClientExplainsMissingServer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "none.sock")
	_, err := NewClient(path).Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "writeboost serve") {
		t.Fatalf("err = %v, want advice to start the server", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWriteStatusNamesEveryField(t *testing.T) {
	st := engine.Status{NrDirtyCacheBlocks: 12, CacheSize: 1 << 30, ReadHitRatio: 0.5,
		Tunables: engine.DefaultTunables(), Stat: engine.Counters{WriteMissCachePartial: 3}}
	var b strings.Builder
	if err := WriteStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"nr_dirty_cache_blocks ", " 12\n", "cache_size", "(1.0 GiB)", "(50.0%)",
		"stat:", "  write_miss_cache_partial", "tunables:", "  writeback_threshold",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status text lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "last_error") {
		t.Errorf("empty last_error printed:\n%s", out)
	}
}

// TestWriteStatusHealth: the health state and each cause's message are
// printed one per line, readable by a person.
func TestWriteStatusHealth(t *testing.T) {
	st := engine.Status{Health: engine.Health{State: engine.HealthDegraded, Causes: []engine.Cause{
		{Kind: engine.CauseWritebackFailing, Message: "writeback to the backing device is failing"},
		{Kind: engine.CauseBackingIOErrors, Message: "3 I/O errors on the backing device"}}}}
	var b strings.Builder
	if err := WriteStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"health:", "  state ", "degraded\n", "  causes:",
		"    writeback_failing ", "writeback to the backing device is failing\n",
		"    backing_io_errors ", "3 I/O errors on the backing device\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("status text lacks %q:\n%s", want, out)
		}
	}
}
