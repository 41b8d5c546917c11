package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// Runner runs an lvm tool and returns its stdout (a seam for tests).
type Runner func(ctx context.Context, name string, args ...string) (stdout []byte, err error)

func execRunner(ctx context.Context, name string, args ...string) ([]byte, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// ZeroFunc makes bytes [off, off+n) of the device at path read as zeros,
// durably (a seam for tests; nil is ZeroRange).
type ZeroFunc func(path string, off, n int64) (method string, err error)

// LVM is a pool of logical volumes in one volume group, managed with the
// lvm tools (lvcreate, lvextend, lvrename, lvreduce, lvremove, lvs, vgs).
// Volumes are fully allocated (no thin provisioning), so capacity is the
// group's free space.
//
// # No previous tenant's data
//
// A thick LV gets whatever its extents held, and lvcreate --zero only
// clears the first 4 KiB. Zeroing a whole new LV on the request path is
// no answer on an HDD (about 1.6 h per TiB when the disk has no WRITE
// ZEROES and the kernel writes the zeros itself), so the pool keeps one
// invariant instead: the group's free extents read as zeros.
//
//   - Adoption: the first time the pool sees its group (no tag
//     writeboost_zeroed on it), all free space is taken into a wipe LV in
//     one lvcreate, and only then is the tag set; with zeroFreeSpace:
//     false the administrator vouches that the free space reads zeros.
//   - Delete renames the LV to a wipe name (wb+wipe+N: '+' never occurs
//     in a volume name), one atomic metadata change, so the name is free
//     at once and the extents are not.
//   - A background wiper zeroes each wipe LV from its end, one chunk at a
//     time, and hands each zeroed chunk back with lvreduce (lvremove for
//     the last). The LV's remaining size is the durable progress record:
//     after a crash the wiper resumes where it stopped, re-zeroing at
//     most one chunk. Capacity (vg_free) never counts what is still being
//     wiped, and grows as chunks come back.
//   - Zeroing uses what the device offers (ZeroRange): an offloaded
//     WRITE ZEROES (which on SSDs is usually an unmap), else the
//     kernel's BLKZEROOUT, which writes zero pages: slow on an HDD, but
//     off the request path.
//   - Create makes the LV with the tag writeboost_pending, zeroes its
//     first MiB (defence in depth: signatures, an engine superblock) and
//     only then removes the tag; an LV still tagged is never handed out
//     (Lookup refuses it) and a retried Create finishes the job, so a
//     crash between lvcreate and zeroing cannot leak a superblock or a
//     filesystem. Extensions (lvextend) come from the zeroed free space.
//
// The volume group must be dedicated to the pool: an LV that someone
// else removes returns unzeroed extents.
type LVM struct {
	VG  string
	Run Runner
	// Zero zeroes a range of a device (nil: ZeroRange on the real device).
	Zero ZeroFunc
	// ZeroFreeSpace wipes the group's free space when the pool first
	// adopts it (Config.ZeroFreeSpace; the default is true).
	ZeroFreeSpace bool
	// WipeChunk is the most the wiper zeroes before handing space back
	// (rounded to whole extents; 0: 1 GiB).
	WipeChunk int64
	// DevDir is where the LVs' device nodes are (default /dev).
	DevDir string

	adoptMu sync.Mutex // one adoption at a time
	mu      struct {
		sync.Mutex
		adopted   bool
		wiping    map[string]int64 // wipe LV -> bytes left
		wipedSum  int64
		lastErr   error
		started   bool
		closed    bool
		wake      chan struct{}
		done      chan struct{}
		cancelRun context.CancelFunc
	}
}

const (
	// pendingTag marks an LV whose first MiB is not yet known zero.
	pendingTag = "writeboost_pending"
	// zeroedTag marks a group whose free space the pool has taken in.
	zeroedTag = "writeboost_zeroed"
	// wipePrefix names LVs being wiped.
	wipePrefix = "wb+wipe+"
	// headBytes is zeroed at the start of every new logical volume.
	headBytes = 1 << 20
	// defaultWipeChunk bounds the work between two hand-backs.
	defaultWipeChunk = 1 << 30
)

func (l *LVM) String() string { return "lvm:" + l.VG }

func (l *LVM) run(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r := l.Run
	if r == nil {
		r = execRunner
	}
	return r(ctx, args[0], args[1:]...)
}

func (l *LVM) zero(path string, off, n int64) (string, error) {
	if l.Zero != nil {
		return l.Zero(path, off, n)
	}
	return ZeroRange(path, off, n)
}

func (l *LVM) devPath(name string) string {
	dir := l.DevDir
	if dir == "" {
		dir = "/dev"
	}
	return dir + "/" + l.VG + "/" + name
}

func (l *LVM) lv(name string) (string, error) {
	if !nameRE.MatchString(name) || strings.Contains(name, "..") {
		return "", fmt.Errorf("pool: bad volume name %q", name)
	}
	return l.VG + "/" + name, nil
}

// bytesField parses lvm's "--units b --nosuffix" output.
func bytesField(s string) (int64, error) {
	s = strings.TrimSpace(s)
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("pool: lvm printed %q, not a byte count", s)
	}
	return n, nil
}

func hasTag(tags, tag string) bool {
	return slices.Contains(strings.Split(strings.TrimSpace(tags), ","), tag)
}

// lookup returns the size of an LV and whether it is still pending.
func (l *LVM) lookup(name string) (size int64, pending bool, err error) {
	lv, err := l.lv(name)
	if err != nil {
		return 0, false, err
	}
	out, err := l.run("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|", "-o", "lv_size,lv_tags", lv)
	if err != nil {
		if strings.Contains(err.Error(), "Failed to find logical volume") || strings.Contains(err.Error(), "not found") {
			return 0, false, fmt.Errorf("%w: %s", ErrNotFound, lv)
		}
		return 0, false, fmt.Errorf("pool: %w", err)
	}
	f := strings.SplitN(strings.TrimSpace(string(out)), "|", 2)
	n, err := bytesField(f[0])
	if err != nil {
		return 0, false, err
	}
	return n, len(f) == 2 && hasTag(f[1], pendingTag), nil
}

// Create implements Pool.
func (l *LVM) Create(name string, size int64) (string, error) {
	lv, err := l.lv(name)
	if err != nil {
		return "", err
	}
	if size <= 0 || size%4096 != 0 {
		return "", fmt.Errorf("pool: size %d is not a positive multiple of 4096", size)
	}
	if err := l.adopt(); err != nil {
		return "", err
	}
	have, pending, err := l.lookup(name)
	switch {
	case err == nil:
		// lvm rounds up to its extent size: accept what the first call got.
		if have < size || have >= size+extentSlack {
			return "", fmt.Errorf("%w: %s is %d bytes, asked %d", ErrSizeClash, name, have, size)
		}
		if !pending {
			return l.devPath(name), nil
		}
		// An earlier Create stopped between lvcreate and the end of
		// zeroing: finish it.
	case errors.Is(err, ErrNotFound):
		if free, err := l.Capacity(); err == nil && free < size {
			return "", fmt.Errorf("%w: %s needs %d bytes, volume group %s has %d free%s", ErrNoSpace, name, size, l.VG, free, l.wipingNote())
		}
		if _, err := l.run("lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y", "--addtag", pendingTag,
			"--name", name, "--size", strconv.FormatInt(size, 10)+"b", l.VG); err != nil {
			if strings.Contains(err.Error(), "insufficient free space") {
				return "", fmt.Errorf("%w: %v%s", ErrNoSpace, err, l.wipingNote())
			}
			return "", fmt.Errorf("pool: create %s: %w", lv, err)
		}
	default:
		return "", err
	}
	path := l.devPath(name)
	if _, err := l.zero(path, 0, min(size, headBytes)); err != nil {
		return "", fmt.Errorf("pool: zero the start of %s: %w", path, err)
	}
	if _, err := l.run("lvchange", "--deltag", pendingTag, lv); err != nil {
		return "", fmt.Errorf("pool: mark %s ready: %w", lv, err)
	}
	return path, nil
}

// wipingNote tells a caller refused for space that more is on its way.
func (l *LVM) wipingNote() string {
	if n := l.WipePending(); n > 0 {
		return fmt.Sprintf(" (%d bytes are being wiped and will come back)", n)
	}
	return ""
}

// extentSlack is how much bigger than asked an LV may be (lvm rounds up to
// the extent size, 4 MiB by default; allow up to 64 MiB extents).
const extentSlack = 64 << 20

// Expand implements Pool. The new extents come from the free space, which
// reads as zeros.
func (l *LVM) Expand(name string, size int64) error {
	lv, err := l.lv(name)
	if err != nil {
		return err
	}
	have, pending, err := l.lookup(name)
	if err != nil {
		return err
	}
	if pending {
		return fmt.Errorf("%w: %s is still being created", ErrNotFound, lv)
	}
	if have >= size {
		return nil
	}
	if _, err := l.run("lvextend", "--size", strconv.FormatInt(size, 10)+"b", lv); err != nil {
		if strings.Contains(err.Error(), "insufficient free space") {
			return fmt.Errorf("%w: %v%s", ErrNoSpace, err, l.wipingNote())
		}
		return fmt.Errorf("pool: extend %s: %w", lv, err)
	}
	return nil
}

// Delete implements Pool: the LV is renamed for the wiper, which returns
// its extents to the group once they read as zeros.
func (l *LVM) Delete(name string) error {
	lv, err := l.lv(name)
	if err != nil {
		return err
	}
	size, _, err := l.lookup(name)
	if errors.Is(err, ErrNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	to := wipePrefix + strconv.FormatInt(time.Now().UnixNano(), 36)
	if _, err := l.run("lvrename", l.VG, name, to); err != nil {
		return fmt.Errorf("pool: hand %s to the wiper: %w", lv, err)
	}
	l.mu.Lock()
	if l.mu.wiping == nil {
		l.mu.wiping = map[string]int64{}
	}
	l.mu.wiping[to] = size
	l.mu.Unlock()
	klog.InfoS("Volume handed to the wiper", "pool", l.String(), "volume", name, "wipeLV", to)
	l.kick()
	return nil
}

// Lookup implements Pool. An LV whose creation did not finish is not
// handed out.
func (l *LVM) Lookup(name string) (string, int64, error) {
	n, pending, err := l.lookup(name)
	if err != nil {
		return "", 0, err
	}
	if pending {
		return "", 0, fmt.Errorf("%w: %s/%s is not zeroed yet (its CreateVolume did not finish)", ErrNotFound, l.VG, name)
	}
	return l.devPath(name), n, nil
}

// Capacity implements Pool: the group's free extents, which never include
// what is still being wiped.
func (l *LVM) Capacity() (int64, error) {
	out, err := l.run("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", l.VG)
	if err != nil {
		return 0, fmt.Errorf("pool: %w", err)
	}
	return bytesField(string(out))
}

// Check implements Pool.
func (l *LVM) Check() error {
	_, err := l.Capacity()
	return err
}

// adopt takes the group's free space into a wipe LV the first time the
// pool sees the group, so that free extents read as zeros from then on.
func (l *LVM) adopt() error {
	l.adoptMu.Lock()
	defer l.adoptMu.Unlock()
	l.mu.Lock()
	done := l.mu.adopted || !l.ZeroFreeSpace
	l.mu.Unlock()
	if done {
		return nil
	}
	out, err := l.run("vgs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|", "-o", "vg_free,vg_tags", l.VG)
	if err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	f := strings.SplitN(strings.TrimSpace(string(out)), "|", 2)
	if len(f) == 2 && hasTag(f[1], zeroedTag) {
		l.mu.Lock()
		l.mu.adopted = true
		l.mu.Unlock()
		return nil
	}
	free, err := bytesField(f[0])
	if err != nil {
		return err
	}
	if free > 0 {
		name := wipePrefix + strconv.FormatInt(time.Now().UnixNano(), 36)
		if _, err := l.run("lvcreate", "--yes", "--wipesignatures", "n", "--zero", "n", "--name", name,
			"--extents", "100%FREE", l.VG); err != nil {
			return fmt.Errorf("pool: take the free space of %s in for wiping: %w", l.VG, err)
		}
		klog.InfoS("Adopting a volume group: its free space is wiped before use", "pool", l.String(), "bytes", free, "wipeLV", name)
	}
	if _, err := l.run("vgchange", "--addtag", zeroedTag, l.VG); err != nil {
		return fmt.Errorf("pool: tag %s: %w", l.VG, err)
	}
	l.mu.Lock()
	l.mu.adopted = true
	l.mu.Unlock()
	l.kick()
	return nil
}

// WipeStatus reports the background wiper.
type WipeStatus struct {
	PendingBytes int64 // still to be zeroed and handed back
	WipedBytes   int64 // zeroed and handed back since the pool started
	Err          error // the last failure, nil once a wipe succeeds
}

// Wiper is a pool that zeroes released space in the background.
type Wiper interface {
	// StartWiper starts the background wiper (once); Close stops it.
	StartWiper()
	WipeStatus() WipeStatus
	Close() error
}

// WipePending is the bytes still being wiped.
func (l *LVM) WipePending() int64 { return l.WipeStatus().PendingBytes }

// WipeStatus implements Wiper.
func (l *LVM) WipeStatus() WipeStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	var n int64
	for _, b := range l.mu.wiping {
		n += b
	}
	return WipeStatus{PendingBytes: n, WipedBytes: l.mu.wipedSum, Err: l.mu.lastErr}
}

// StartWiper implements Wiper: one goroutine, owned by the pool, resumes
// every wipe a previous process left and runs each new one.
func (l *LVM) StartWiper() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.started || l.mu.closed {
		return
	}
	l.mu.started = true
	l.mu.wake = make(chan struct{}, 1)
	l.mu.done = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	l.mu.cancelRun = cancel
	l.mu.wake <- struct{}{}
	go l.wipeLoop(ctx, l.mu.wake, l.mu.done)
}

// Close implements Wiper: stops the wiper after its current chunk (the
// rest resumes at the next start).
func (l *LVM) Close() error {
	l.mu.Lock()
	l.mu.closed = true
	cancel, done := l.mu.cancelRun, l.mu.done
	l.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	return nil
}

func (l *LVM) kick() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.wake != nil {
		select {
		case l.mu.wake <- struct{}{}:
		default:
		}
	}
}

// wipeRetry is how long the wiper waits after a failure.
var wipeRetry = 30 * time.Second

func (l *LVM) wipeLoop(ctx context.Context, wake <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	// The wiper's zeroing gives way to the volumes' own I/O where the I/O
	// scheduler honours priorities (BFQ): an HDD wipe must not starve
	// writeback. The thread keeps the priority, so the goroutine keeps
	// the thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := setLowIOPriority(); err != nil {
		klog.V(2).InfoS("Wiper runs at normal I/O priority", "pool", l.String(), "err", err)
	}
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-retry:
		}
		retry = nil
		if err := l.wipeAll(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			l.mu.Lock()
			l.mu.lastErr = err
			l.mu.Unlock()
			klog.ErrorS(err, "Wiping released space failed; retrying", "pool", l.String(), "in", wipeRetry)
			retry = time.After(wipeRetry)
		}
	}
}

// wipeLVs lists the group's wipe LVs and their sizes.
func (l *LVM) wipeLVs() (map[string]int64, error) {
	out, err := l.run("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|", "-o", "lv_name,lv_size", l.VG)
	if err != nil {
		return nil, fmt.Errorf("pool: %w", err)
	}
	m := map[string]int64{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.SplitN(strings.TrimSpace(line), "|", 2)
		if len(f) != 2 || !strings.HasPrefix(f[0], wipePrefix) {
			continue
		}
		n, err := bytesField(f[1])
		if err != nil {
			return nil, err
		}
		m[f[0]] = n
	}
	return m, nil
}

func (l *LVM) extentSize() (int64, error) {
	out, err := l.run("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", l.VG)
	if err != nil {
		return 0, fmt.Errorf("pool: %w", err)
	}
	return bytesField(string(out))
}

// wipeAll wipes every wipe LV until none is left.
func (l *LVM) wipeAll(ctx context.Context) error {
	if err := l.adopt(); err != nil {
		return err
	}
	for {
		lvs, err := l.wipeLVs()
		if err != nil {
			return err
		}
		l.mu.Lock()
		l.mu.wiping = maps.Clone(lvs)
		l.mu.Unlock()
		if len(lvs) == 0 {
			return nil
		}
		ext, err := l.extentSize()
		if err != nil {
			return err
		}
		names := make([]string, 0, len(lvs))
		for n := range lvs {
			names = append(names, n)
		}
		slices.Sort(names)
		for _, name := range names {
			if err := l.wipeOne(ctx, name, lvs[name], ext); err != nil {
				return err
			}
		}
	}
}

// wipeOne zeroes an LV from its end, handing each zeroed chunk back.
func (l *LVM) wipeOne(ctx context.Context, name string, size, ext int64) error {
	chunk := l.WipeChunk
	if chunk <= 0 {
		chunk = defaultWipeChunk
	}
	chunk = max(chunk/ext, 1) * ext
	path, lv := l.devPath(name), l.VG+"/"+name
	began, total := time.Now(), size
	klog.InfoS("Wiping released space", "pool", l.String(), "wipeLV", name, "bytes", size)
	// The head first: lvreduce must not find an old filesystem's
	// signature (newer lvm refuses to shrink below a filesystem).
	if _, err := l.zero(path, 0, min(size, headBytes)); err != nil {
		return fmt.Errorf("pool: zero the start of %s: %w", lv, err)
	}
	for size > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(chunk, size)
		if size%ext != 0 { // never: lvm sizes are whole extents
			n = size % ext
		}
		method, err := l.zero(path, size-n, n)
		if err != nil {
			return fmt.Errorf("pool: zero %s [%d, %d): %w", lv, size-n, size, err)
		}
		if size == n {
			_, err = l.run("lvremove", "--yes", lv)
		} else {
			_, err = l.run("lvreduce", "--yes", "--force", "--size", strconv.FormatInt(size-n, 10)+"b", lv)
		}
		if err != nil {
			return fmt.Errorf("pool: hand back %d wiped bytes of %s: %w", n, lv, err)
		}
		size -= n
		l.mu.Lock()
		if l.mu.wiping == nil {
			l.mu.wiping = map[string]int64{}
		}
		l.mu.wiping[name] = size
		if size == 0 {
			delete(l.mu.wiping, name)
		}
		l.mu.wipedSum += n
		l.mu.lastErr = nil
		l.mu.Unlock()
		if done := total - size; done*10/total != (done-n)*10/total {
			klog.InfoS("Wipe progress", "pool", l.String(), "wipeLV", name, "percent", done*100/total, "left", size, "method", method)
		}
	}
	el := time.Since(began)
	klog.InfoS("Released space wiped and returned", "pool", l.String(), "wipeLV", name, "bytes", total,
		"seconds", el.Seconds(), "bytesPerSecond", float64(total)/max(el.Seconds(), 1e-9))
	return nil
}
