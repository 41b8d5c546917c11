package volume

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/control"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
)

// IOMode is how the cache and backing devices are opened. One policy for
// both devices and for both front ends (writeboost serve and the CSI
// plugin).
type IOMode int

const (
	// DirectIO (the default) opens both devices with O_DIRECT: the engine
	// is the cache, and the page cache on top of either device would only
	// hold a second copy of the same blocks (in a pod's memory cgroup, at
	// that). A filesystem that refuses O_DIRECT (tmpfs) gets buffered I/O,
	// logged; durability is the same either way, since every promise rests
	// on Flush (fdatasync).
	DirectIO IOMode = iota
	// BufferedIO opens both devices through the page cache (serve
	// --direct=false: image files on a laptop, benchmarks of the page-cached
	// case).
	BufferedIO
)

func (m IOMode) String() string {
	if m == BufferedIO {
		return "buffered"
	}
	return "direct"
}

// Attacher turns a served export into a local block device. Production
// uses SystemAttacher (package attach); tests use a fake.
type Attacher interface {
	// Attach publishes the export as a block device, or re-adopts the
	// device an earlier process left for the same volume (a kernel device
	// gets fresh connections; the fallback's relay reconnects by itself).
	Attach(ctx context.Context, o attach.Options) (attach.Attachment, error)
	// Detach undoes the attachment of device. A device that is already
	// gone is not an error.
	Detach(ctx context.Context, stateDir, device string) error
	// Resize makes the attached device of volumeID size bytes as the
	// kernel sees it, after the volume grew; repeating it is harmless.
	Resize(ctx context.Context, stateDir, volumeID string, size int64) (attach.Attachment, error)
}

// SystemAttacher attaches with package attach: the kernel nbd driver over
// netlink where there is one, else nbdfuse and a loop device.
type SystemAttacher struct{}

// Attach implements Attacher.
func (SystemAttacher) Attach(ctx context.Context, o attach.Options) (attach.Attachment, error) {
	a, err := attach.Attach(ctx, o)
	if errors.Is(err, attach.ErrAlreadyAttached) && a != nil {
		// A restart: the device survived the process that served it. The
		// kernel device needs fresh sockets; the relay reconnects itself.
		if a.Method == attach.MethodNetlink {
			dial := attach.UnixDialer(o.Socket, o.Export, 30*time.Second)
			ra, rerr := attach.Reattach(ctx, o.StateDir, o.VolumeID, dial, o)
			if rerr != nil {
				return attach.Attachment{}, fmt.Errorf("reattach %s: %w", a.Device, rerr)
			}
			a = ra
		}
		klog.InfoS("Re-adopted attached device", "volume", o.VolumeID, "device", a.Device, "method", a.Method)
		return *a, nil
	}
	if err != nil {
		return attach.Attachment{}, err
	}
	return *a, nil
}

// Resize implements Attacher.
func (SystemAttacher) Resize(ctx context.Context, stateDir, volumeID string, size int64) (attach.Attachment, error) {
	a, err := attach.Resize(ctx, stateDir, volumeID, size)
	if err != nil {
		return attach.Attachment{}, err
	}
	return *a, nil
}

// Detach implements Attacher.
func (SystemAttacher) Detach(ctx context.Context, stateDir, device string) error {
	err := attach.Detach(ctx, stateDir, device)
	if errors.Is(err, attach.ErrNotAttached) {
		return nil // documented: already detached
	}
	return err
}

// Config says how to run one volume.
type Config struct {
	// ID names the volume in logs and in the export's description.
	ID string
	// CachePath and BackingPath are the devices (files or block devices).
	// The cache file is locked (flock) for the life of the runtime, so two
	// processes never run one log.
	CachePath, BackingPath string
	// Cache and Backing, when set, are used instead of opening the paths
	// (tests: in-memory devices). No lock is taken then.
	Cache, Backing blockdev.Device
	// IO is the device open policy.
	IO IOMode
	// WrapBacking, when set, wraps the opened backing device (serve
	// --simulate-hdd puts the HDD model there); WrapCache the cache
	// device (tests: a slow one).
	WrapBacking, WrapCache func(blockdev.Device) blockdev.Device

	// Engine options (see engine.Options).
	Format, Reformat, AllowBackingGrowth bool
	BackingDiscard                       bool
	SegmentSize, RAMBuffers              int
	BufferPath                           string
	Tunables                             engine.Tunables

	// Socket is the NBD unix socket (0600); ExportName the export's name.
	Socket, ExportName string
	// NoInline: see nbd.Config (slow backends).
	NoInline bool
	// Control is the control socket (0600); "" = none.
	Control string

	// Attacher, when set, attaches the export as a block device with
	// AttachOptions (Socket, Export and VolumeID are filled in; VolumeID
	// defaults to ID).
	Attacher      Attacher
	AttachOptions attach.Options
}

// Volume is one running cached volume: the devices, their lock, the
// engine, the NBD server, the control socket and the attachment. Start
// brings them up in that order and Stop takes them down in reverse; both
// undo what they did on failure, and Stop may be called again after a
// failure and picks up where it stopped.
type Volume struct {
	cfg Config

	mu struct {
		sync.Mutex
		lock    *os.File
		devs    []blockdev.Device // cache, backing (closed after the engine)
		eng     *engine.Engine
		srv     *nbd.Server
		ctl     *control.Server
		att     *attach.Attachment
		stopped bool
		// dirtyClose: the engine's Close failed, so its clean checkpoint
		// may be missing: a later Stop reopens (recovers) and closes again.
		dirtyClose bool
		// cacheFailed: that Close failed because the cache device had
		// failed (engine.ErrCacheFailed).
		cacheFailed bool
	}
	serveWG sync.WaitGroup
	done    chan error // the NBD server stopped on its own
}

// Start opens (formatting or recovering) the cache, serves it and, when
// configured, attaches it.
func Start(ctx context.Context, cfg Config) (_ *Volume, err error) {
	if cfg.Socket == "" {
		return nil, errors.New("volume: an NBD socket is required")
	}
	v := &Volume{cfg: cfg, done: make(chan error, 1)}
	defer func() {
		if err != nil {
			if serr := v.Stop(context.Background()); serr != nil {
				klog.ErrorS(serr, "Undoing a failed start", "volume", cfg.ID)
			}
		}
	}()
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.openEngineLocked(ctx, cfg.Format, cfg.Reformat); err != nil {
		return nil, err
	}
	if err := v.serveLocked(); err != nil {
		return nil, err
	}
	if cfg.Attacher != nil {
		o := cfg.AttachOptions
		o.Socket, o.Export = cfg.Socket, cfg.ExportName
		if o.VolumeID == "" {
			o.VolumeID = cfg.ID
		}
		a, err := cfg.Attacher.Attach(ctx, o)
		if err != nil {
			return nil, fmt.Errorf("attach: %w", err)
		}
		v.mu.att = &a
		// A re-adopted device may be smaller than the engine: the volume
		// grew at open (AllowBackingGrowth) or a live grow stopped between
		// the engine and the device. Finish it, so a retry converges.
		if size := v.mu.eng.Size(); a.Size != 0 && a.Size < size {
			if err := v.resizeLocked(ctx, size); err != nil {
				return nil, err
			}
		}
	}
	return v, nil
}

// Grow makes the running volume size bytes while it serves I/O: the
// storage under the backing device must already have grown (the pool's
// Expand); the engine takes it (crash-safely: engine.Grow), then the
// attached device is resized, so the kernel (and the filesystem's resize
// after it) sees the new size. A retry after a failure at any step
// converges: each step is a no-op once done.
func (v *Volume) Grow(ctx context.Context, size int64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mu.eng == nil {
		return errors.New("volume: not running")
	}
	if err := v.mu.eng.Grow(size); err != nil {
		return fmt.Errorf("grow the engine to %d bytes: %w", size, err)
	}
	if v.mu.att == nil {
		return nil
	}
	return v.resizeLocked(ctx, size)
}

func (v *Volume) resizeLocked(ctx context.Context, size int64) error {
	a, err := v.cfg.Attacher.Resize(ctx, v.cfg.AttachOptions.StateDir, v.mu.att.VolumeID, size)
	if err != nil {
		return fmt.Errorf("resize %s to %d bytes: %w", v.mu.att.Device, size, err)
	}
	v.mu.att = &a
	return nil
}

// OpenDevices opens the cache and backing of cfg under the IO policy and
// takes the cache's lock. Callers close the devices and the lock.
func openDevices(cfg Config) (lock *os.File, cache, backing blockdev.Device, err error) {
	if cfg.Cache != nil && cfg.Backing != nil {
		return nil, cfg.Cache, cfg.Backing, nil
	}
	lock, err = LockFile(cfg.CachePath)
	if err != nil {
		return nil, nil, nil, err
	}
	cf, err := openPolicy(cfg.CachePath, cfg.IO)
	if err != nil {
		lock.Close()
		return nil, nil, nil, fmt.Errorf("open cache %s: %w", cfg.CachePath, err)
	}
	var c blockdev.Device = cf
	if cfg.WrapCache != nil {
		c = cfg.WrapCache(cf)
	}
	b, err := openPolicy(cfg.BackingPath, cfg.IO)
	if err != nil {
		c.Close()
		lock.Close()
		return nil, nil, nil, fmt.Errorf("open backing %s: %w", cfg.BackingPath, err)
	}
	backing = b
	if cfg.WrapBacking != nil {
		backing = cfg.WrapBacking(b)
	}
	return lock, c, backing, nil
}

// openPolicy opens path as IOMode m says.
func openPolicy(path string, m IOMode) (*blockdev.File, error) {
	if m == BufferedIO {
		return blockdev.OpenFile(path, blockdev.FileOptions{})
	}
	f, err := blockdev.OpenFile(path, blockdev.FileOptions{Direct: true})
	if err != nil && errors.Is(err, unix.EINVAL) {
		klog.InfoS("The filesystem refuses O_DIRECT; opening through the page cache", "path", path, "err", err)
		return blockdev.OpenFile(path, blockdev.FileOptions{})
	}
	return f, err
}

func (v *Volume) engineOptions(ctx context.Context, format, reformat bool) engine.Options {
	c := v.cfg
	return engine.Options{
		Context: ctx,
		Cache:   v.mu.devs[0], Backing: v.mu.devs[1],
		Format: format, Reformat: reformat, AllowBackingGrowth: c.AllowBackingGrowth,
		BackingDiscard: c.BackingDiscard,
		SegmentSize:    c.SegmentSize, RAMBuffers: c.RAMBuffers, BufferPath: c.BufferPath,
		Tunables: c.Tunables, Name: c.ID,
	}
}

func (v *Volume) openEngineLocked(ctx context.Context, format, reformat bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	lock, cache, backing, err := openDevices(v.cfg)
	if err != nil {
		return err
	}
	v.mu.lock, v.mu.devs = lock, []blockdev.Device{cache, backing}
	start := time.Now()
	eng, err := engine.Open(v.engineOptions(ctx, format, reformat))
	if err != nil {
		return fmt.Errorf("open cache engine: %w", err)
	}
	v.mu.eng = eng
	st := eng.Status()
	klog.InfoS("Cache open", "volume", v.cfg.ID, "cache", v.cfg.CachePath, "backing", v.cfg.BackingPath,
		"io", v.cfg.IO.String(), "uuid", st.UUID, "dirtyBlocks", st.NrDirtyCacheBlocks, "openSeconds", time.Since(start).Seconds())
	return nil
}

// multiConn tells the NBD server that a flush on one connection covers
// writes acknowledged on all: the engine has one log, and its Flush makes
// every acknowledged write durable.
type multiConn struct{ *engine.Engine }

func (multiConn) MultiConnSafe() bool { return true }

func (v *Volume) serveLocked() error {
	srv := nbd.NewServer(nbd.Config{NoInline: v.cfg.NoInline})
	desc := "writeboost " + v.cfg.ID
	if err := srv.AddExport(nbd.Export{Name: v.cfg.ExportName, Description: desc, Backend: multiConn{v.mu.eng},
		MinBlockSize: 512, PreferredBlockSize: 4096}); err != nil {
		return fmt.Errorf("NBD export: %w", err)
	}
	l, err := nbd.ListenUnix(v.cfg.Socket, 0o600)
	if err != nil {
		return fmt.Errorf("NBD socket %s: %w", v.cfg.Socket, err)
	}
	v.mu.srv = srv
	v.serveWG.Add(1)
	go func() {
		defer v.serveWG.Done()
		if err := srv.Serve(l); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			klog.ErrorS(err, "NBD server stopped", "volume", v.cfg.ID)
			v.done <- err
		}
	}()
	if v.cfg.Control == "" {
		return nil
	}
	ctl := control.NewServer(v.mu.eng)
	cl, err := control.Listen(v.cfg.Control)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", v.cfg.Control, err)
	}
	v.mu.ctl = ctl
	v.serveWG.Add(1)
	go func() {
		defer v.serveWG.Done()
		if err := ctl.Serve(cl); err != nil {
			klog.ErrorS(err, "Control socket failed", "volume", v.cfg.ID, "socket", v.cfg.Control)
		}
	}()
	return nil
}

// Engine is the volume's engine (nil once stopped).
func (v *Volume) Engine() *engine.Engine {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.mu.eng
}

// Attachment is the block device the volume is attached as, if any.
func (v *Volume) Attachment() (attach.Attachment, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mu.att == nil {
		return attach.Attachment{}, false
	}
	return *v.mu.att, true
}

// Done delivers the error of an NBD server that stopped on its own.
func (v *Volume) Done() <-chan error { return v.done }

// Detach undoes the attachment (the filesystem on it must be unmounted).
// Detaching a volume that is not attached does nothing.
func (v *Volume) Detach(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.detachLocked(ctx)
}

func (v *Volume) detachLocked(ctx context.Context) error {
	if v.mu.att == nil {
		return nil
	}
	if err := v.cfg.Attacher.Detach(ctx, v.cfg.AttachOptions.StateDir, v.mu.att.Device); err != nil {
		return fmt.Errorf("detach %s: %w", v.mu.att.Device, err)
	}
	v.mu.att = nil
	return nil
}

// Stop shuts the volume down: detach (when detach is true), stop the NBD
// server and the control socket, close the engine (flush and clean
// checkpoint), close the devices and release the lock. The RAM buffer file
// is removed after a clean close unless keepBuffer. After a failure a
// second Stop resumes: a failed engine Close leaves the cache as a crash
// would (nothing acknowledged is lost: the buffer file is kept), and the
// retry recovers it and closes it cleanly.
func (v *Volume) Stop(ctx context.Context) error { return v.stop(ctx, true, false) }

// Release stops serving and closes the engine but leaves the device
// attached and the RAM buffers in place, for the next process to re-adopt
// (a graceful restart of the plugin).
func (v *Volume) Release(ctx context.Context) error { return v.stop(ctx, false, true) }

func (v *Volume) stop(ctx context.Context, detach, keepBuffer bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if detach {
		if err := v.detachLocked(ctx); err != nil {
			return err
		}
	}
	var errs []error
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if v.mu.srv != nil {
		if err := v.mu.srv.Shutdown(sctx); err != nil {
			errs = append(errs, fmt.Errorf("stop NBD server: %w", err))
		}
	}
	if v.mu.ctl != nil {
		if err := v.mu.ctl.Shutdown(sctx); err != nil {
			errs = append(errs, fmt.Errorf("stop control socket: %w", err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	v.serveWG.Wait()
	v.mu.srv, v.mu.ctl = nil, nil
	if v.mu.eng == nil && v.mu.dirtyClose {
		// A retry after a failed Close: recover and close again.
		if err := v.openEngineLocked(ctx, false, false); err != nil {
			v.closeDevicesLocked()
			if v.mu.cacheFailed && errors.Is(err, engine.ErrIO) {
				// The cache device failed while the volume ran and still
				// fails: no retry can close it cleanly, and an unstage
				// that never succeeds helps nobody. Stop, leaving the
				// cache as it failed (for `writeboost check` and the
				// recovery of the next Stage) and the RAM buffer file,
				// which may hold writes the cache device does not.
				klog.ErrorS(err, "Volume stopped without a clean close: its cache device failed and still cannot be opened; the cache and the RAM buffer file are left for recovery",
					"volume", v.cfg.ID, "cache", v.cfg.CachePath)
				v.mu.dirtyClose, v.mu.stopped = false, true
				return nil
			}
			return fmt.Errorf("reopen to close cleanly: %w", err)
		}
	}
	if v.mu.eng != nil {
		err := v.mu.eng.Close()
		v.mu.eng = nil
		if err != nil {
			v.mu.dirtyClose = true
			v.mu.cacheFailed = errors.Is(err, engine.ErrCacheFailed)
			v.closeDevicesLocked()
			return fmt.Errorf("close cache engine: %w", err)
		}
		v.mu.dirtyClose = false
		if !keepBuffer && v.cfg.BufferPath != "" {
			// Everything the buffers held is on the cache device now.
			if err := os.Remove(v.cfg.BufferPath); err != nil && !errors.Is(err, os.ErrNotExist) {
				klog.ErrorS(err, "Removing the RAM buffer file", "volume", v.cfg.ID)
			}
		}
	}
	if err := v.closeDevicesLocked(); err != nil {
		return err
	}
	v.mu.stopped = true
	return nil
}

func (v *Volume) closeDevicesLocked() error {
	var errs []error
	if v.cfg.Cache == nil || v.cfg.Backing == nil {
		for _, d := range v.mu.devs {
			if err := d.Close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	v.mu.devs = nil
	if v.mu.lock != nil {
		v.mu.lock.Close()
		v.mu.lock = nil
	}
	return errors.Join(errs...)
}

// LockFile takes an exclusive lock on path for as long as the returned
// file stays open, so two processes never run one cache (both would replay
// and append to one log). The lock dies with the process, even on SIGKILL.
// A lock held briefly by someone else (udev probing a new block device
// takes a shared flock) is waited for a few seconds.
func LockFile(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	deadline := time.Now().Add(lockWait)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%s is in use by another writeboost process: %w", path, ErrInUse)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lockWait is how long LockFile waits for a lock held elsewhere.
var lockWait = 5 * time.Second

// ErrInUse is returned when another process holds a cache.
var ErrInUse = errors.New("cache in use")
