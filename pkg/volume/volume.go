// Package volume runs the data path of staged writeboost volumes on a node:
// for each one, the cache engine over its backing and cache devices, an NBD
// server on a private unix socket, the attachment that turns it into a
// block device, and a control socket (status, set, flush, drain) for
// operators and the preStop hook.
//
// Files in the run directory (tmpfs /run on the host: they outlive the
// plugin's process and pod, not a reboot):
//
//	ID.buf      the engine's RAM buffers, a shared mapping: acknowledged but
//	            unflushed writes survive a SIGKILL of the plugin
//	ID.sock     the NBD socket (0600)
//	ID.control  the control socket (0600)
//
// A restarted plugin calls Stage again for every volume it had staged: the
// engine recovers (replaying the RAM buffers), the server listens again on
// the same socket, and the device is kept: the kernel nbd device gets fresh
// sockets (Reattach); on the nbdfuse fallback the relay between nbdfuse and
// the socket reconnects on its own.
package volume

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/control"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
)

// Spec says what to run for a volume.
type Spec struct {
	ID          string
	BackingPath string // file or block device
	CachePath   string // file or block device
	Tunables    engine.Tunables
}

// Manager runs the staged volumes of this node.
type Manager struct {
	RunDir string
	// AttachStateDir keeps the attachment records (must survive restarts
	// of the plugin; under the state dir).
	AttachStateDir string
	// RelayCommand is passed to attach.Options.RelayCommand.
	RelayCommand []string
	// PreferMethod forces an attach method ("" = best available).
	PreferMethod string

	mu   sync.Mutex
	vols map[string]*running
}

type running struct {
	spec    Spec
	devs    []*blockdev.File // closed after the engine
	eng     *engine.Engine
	srv     *nbd.Server
	ctl     *control.Server
	device  string
	method  string
	serveWG sync.WaitGroup
}

// multiConn marks the engine safe for several connections: its Flush is
// global, covering writes replied on every connection.
type multiConn struct{ *engine.Engine }

func (multiConn) MultiConnSafe() bool { return true }

// SocketPath is the NBD socket of id.
func (m *Manager) SocketPath(id string) string { return filepath.Join(m.RunDir, id+".sock") }

// ControlPath is the control socket of id.
func (m *Manager) ControlPath(id string) string { return filepath.Join(m.RunDir, id+".control") }

func (m *Manager) bufferPath(id string) string { return filepath.Join(m.RunDir, id+".buf") }

// Stage starts (or re-adopts after a restart) the volume and returns its
// block device. Calling it for a running volume returns its device.
func (m *Manager) Stage(ctx context.Context, s Spec) (string, error) {
	m.mu.Lock()
	if m.vols == nil {
		m.vols = map[string]*running{}
	}
	if r, ok := m.vols[s.ID]; ok {
		m.mu.Unlock()
		return r.device, nil
	}
	m.mu.Unlock()
	if err := os.MkdirAll(m.RunDir, 0o700); err != nil {
		return "", fmt.Errorf("run dir: %w", err)
	}
	r, err := m.start(ctx, s)
	if err != nil {
		return "", err
	}
	m.mu.Lock()
	m.vols[s.ID] = r
	m.mu.Unlock()
	return r.device, nil
}

func (m *Manager) start(ctx context.Context, s Spec) (_ *running, err error) {
	r := &running{spec: s}
	backing, err := blockdev.OpenFile(s.BackingPath, blockdev.FileOptions{Direct: true})
	if err != nil {
		return nil, fmt.Errorf("open backing %s: %w", s.BackingPath, err)
	}
	cache, err := blockdev.OpenFile(s.CachePath, blockdev.FileOptions{Direct: true})
	if err != nil {
		backing.Close()
		return nil, fmt.Errorf("open cache %s: %w", s.CachePath, err)
	}
	r.devs = []*blockdev.File{cache, backing}
	closeDevs := func() { cache.Close(); backing.Close() }
	r.eng, err = engine.Open(engine.Options{
		Cache: cache, Backing: backing,
		// The pool creates the cache slice zeroed for this volume: a blank
		// cache is ours to format; anything else is recovered or refused.
		Format: true,
		// ControllerExpandVolume grows the backing while unstaged.
		AllowBackingGrowth: true,
		BufferPath:         m.bufferPath(s.ID),
		Tunables:           s.Tunables,
		Name:               s.ID,
	})
	if err != nil {
		closeDevs()
		return nil, fmt.Errorf("open cache engine: %w", err)
	}
	defer func() {
		if err != nil {
			m.stop(r, true)
		}
	}()
	r.srv = nbd.NewServer(nbd.Config{})
	if err := r.srv.AddExport(nbd.Export{Name: "", Description: s.ID, Backend: multiConn{r.eng},
		MinBlockSize: 512, PreferredBlockSize: 4096}); err != nil {
		return nil, err
	}
	l, err := nbd.ListenUnix(m.SocketPath(s.ID), 0o600)
	if err != nil {
		return nil, err
	}
	r.serveWG.Add(1)
	go func() {
		defer r.serveWG.Done()
		if err := r.srv.Serve(l); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			klog.ErrorS(err, "NBD server stopped", "volume", s.ID)
		}
	}()
	r.ctl = control.NewServer(r.eng)
	cl, err := control.Listen(m.ControlPath(s.ID))
	if err != nil {
		return nil, err
	}
	r.serveWG.Add(1)
	go func() {
		defer r.serveWG.Done()
		_ = r.ctl.Serve(cl)
	}()

	o := attach.Options{Socket: m.SocketPath(s.ID), VolumeID: s.ID, StateDir: m.AttachStateDir,
		RelayCommand: m.RelayCommand, PreferMethod: m.PreferMethod}
	a, err := attach.Attach(ctx, o)
	if errors.Is(err, attach.ErrAlreadyAttached) && a != nil {
		// A restart: the device survived us. The kernel device needs fresh
		// sockets; the fallback's relay reconnects by itself.
		if a.Method == attach.MethodNetlink {
			dial := attach.UnixDialer(o.Socket, o.Export, 30*time.Second)
			if _, rerr := attach.Reattach(ctx, m.AttachStateDir, s.ID, dial, o); rerr != nil {
				return nil, fmt.Errorf("reattach %s: %w", a.Device, rerr)
			}
		}
		klog.InfoS("Re-adopted attached device", "volume", s.ID, "device", a.Device, "method", a.Method)
		err = nil
	}
	if err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	r.device, r.method = a.Device, a.Method
	klog.InfoS("Volume running", "volume", s.ID, "device", r.device, "method", r.method,
		"size", r.eng.Size(), "backing", s.BackingPath, "cache", s.CachePath)
	return r, nil
}

// stop shuts the server and control socket and closes the engine (flush,
// clean checkpoint). With keepBuffer false the RAM buffer file is removed
// after a clean close.
func (m *Manager) stop(r *running, keepBuffer bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var errs []error
	if r.srv != nil {
		if err := r.srv.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("nbd shutdown: %w", err))
		}
	}
	if r.ctl != nil {
		_ = r.ctl.Shutdown(ctx)
	}
	r.serveWG.Wait()
	if r.eng != nil {
		if err := r.eng.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close engine: %w", err))
		} else if !keepBuffer {
			os.Remove(m.bufferPath(r.spec.ID))
		}
		for _, d := range r.devs {
			if err := d.Close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Unstage detaches the device (the filesystem must be unmounted), stops
// serving and closes the engine cleanly. Unknown volumes are not an error.
func (m *Manager) Unstage(ctx context.Context, id string, device string) error {
	m.mu.Lock()
	r := m.vols[id]
	m.mu.Unlock()
	if device == "" && r != nil {
		device = r.device
	}
	if device != "" {
		if err := attach.Detach(ctx, m.AttachStateDir, device); err != nil {
			return fmt.Errorf("detach %s: %w", device, err)
		}
	}
	if r == nil {
		return nil
	}
	if err := m.stop(r, false); err != nil {
		return err
	}
	m.mu.Lock()
	delete(m.vols, id)
	m.mu.Unlock()
	return nil
}

// Drain writes back every dirty block of a running volume to its backing
// device, so the backing holds all the data on its own.
func (m *Manager) Drain(ctx context.Context, id string) error {
	m.mu.Lock()
	r := m.vols[id]
	m.mu.Unlock()
	if r == nil {
		return fmt.Errorf("volume %s is not running", id)
	}
	return r.eng.Drain(ctx, nil)
}

// Info reports a running volume.
type Info struct {
	Device string
	Method string
	Size   int64
	Status engine.Status
	Err    error // the engine's sticky I/O error
}

// Get returns the state of a running volume.
func (m *Manager) Get(id string) (Info, bool) {
	m.mu.Lock()
	r := m.vols[id]
	m.mu.Unlock()
	if r == nil {
		return Info{}, false
	}
	return Info{Device: r.device, Method: r.method, Size: r.eng.Size(), Status: r.eng.Status(), Err: r.eng.Err()}, true
}

// IDs lists the running volumes.
func (m *Manager) IDs() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]string, 0, len(m.vols))
	for id := range m.vols {
		ids = append(ids, id)
	}
	return ids
}

// FlushAll makes every acknowledged write of every running volume durable
// on its cache device.
func (m *Manager) FlushAll() error {
	m.mu.Lock()
	rs := make([]*running, 0, len(m.vols))
	for _, r := range m.vols {
		rs = append(rs, r)
	}
	m.mu.Unlock()
	var errs []error
	for _, r := range rs {
		if err := r.eng.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", r.spec.ID, err))
		}
	}
	return errors.Join(errs...)
}

// Shutdown is the graceful stop of the plugin: every engine is flushed and
// closed cleanly, but devices stay attached (pods keep their mounts; the
// next plugin process re-adopts them) and the buffers stay in place.
func (m *Manager) Shutdown() error {
	m.mu.Lock()
	rs := m.vols
	m.vols = map[string]*running{}
	m.mu.Unlock()
	var errs []error
	for id, r := range rs {
		if err := r.eng.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", id, err))
		}
		if err := m.stop(r, true); err != nil {
			errs = append(errs, fmt.Errorf("stop %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}

// FlushViaControl asks a running plugin to flush the volume id through its
// control socket (used by the preStop hook, another process).
func FlushViaControl(ctx context.Context, runDir, id string) error {
	c := control.NewClient(filepath.Join(runDir, id+".control"))
	defer c.Close()
	return c.Flush(ctx)
}
