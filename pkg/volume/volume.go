// Package volume runs cached volumes: Volume (runtime.go) owns one volume's
// life, for both `writeboost serve` and the CSI plugin: open or format the
// cache (one device open policy, IOMode), lock it, recover, serve it over
// NBD, a control socket, attach it as a block device, and stop. Manager
// runs the staged volumes of a CSI node, one Volume each: the cache engine
// over its backing and cache devices, an NBD server on a private unix
// socket, the attachment that turns it into a block device, and a control
// socket (status, set, flush, drain) for operators and the preStop hook.
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

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/control"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// Spec says what to run for a volume.
type Spec struct {
	ID          string
	BackingPath string // file or block device
	CachePath   string // file or block device
	Tunables    engine.Tunables
	// BackingDiscard passes TRIM down to the backing device: only for a
	// thin pool that asks for it (pool.PassesDiscards).
	BackingDiscard bool
	// RAMBuffers is the engine's RAM buffers (0: its default).
	RAMBuffers int
}

// Manager runs the staged volumes of this node, one Volume each.
type Manager struct {
	RunDir string
	// AttachStateDir keeps the attachment records (must survive restarts
	// of the plugin; under the state dir).
	AttachStateDir string
	// RelayCommand is passed to attach.Options.RelayCommand.
	RelayCommand []string
	// PreferMethod forces an attach method ("" = best available).
	PreferMethod string
	// Attacher attaches volumes; nil is SystemAttacher.
	Attacher Attacher
	// Devices, when set, supplies a volume's devices instead of opening
	// its paths (tests: in-memory devices with injected faults).
	Devices func(s Spec) (cache, backing blockdev.Device, err error)
	// WrapCache wraps each opened cache device (tests: a slow device).
	WrapCache func(blockdev.Device) blockdev.Device

	mu   sync.Mutex
	vols map[string]*Volume
}

// SocketPath is the NBD socket of id.
func (m *Manager) SocketPath(id string) string { return filepath.Join(m.RunDir, id+".sock") }

// ControlPath is the control socket of id.
func (m *Manager) ControlPath(id string) string { return filepath.Join(m.RunDir, id+".control") }

func (m *Manager) bufferPath(id string) string { return filepath.Join(m.RunDir, id+".buf") }

func (m *Manager) config(s Spec) Config {
	att := m.Attacher
	if att == nil {
		att = SystemAttacher{}
	}
	return Config{
		ID: s.ID, CachePath: s.CachePath, BackingPath: s.BackingPath, IO: DirectIO,
		// The pool creates the cache slice zeroed for this volume: a blank
		// cache is ours to format; anything else is recovered or refused.
		Format: true,
		// A backing grown while the volume was not running (offline
		// expansion, or a live one interrupted before the engine took it)
		// is taken at open.
		AllowBackingGrowth: true,
		BackingDiscard:     s.BackingDiscard,
		RAMBuffers:         s.RAMBuffers,
		BufferPath:         m.bufferPath(s.ID),
		Tunables:           s.Tunables,
		Socket:             m.SocketPath(s.ID),
		Control:            m.ControlPath(s.ID),
		Attacher:           att,
		WrapCache:          m.WrapCache,
		AttachOptions: attach.Options{VolumeID: s.ID, StateDir: m.AttachStateDir,
			RelayCommand: m.RelayCommand, PreferMethod: m.PreferMethod},
	}
}

func (m *Manager) get(id string) *Volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vols[id]
}

// Stage starts (or re-adopts after a restart) the volume and returns its
// block device. Calling it for a running volume returns its device.
func (m *Manager) Stage(ctx context.Context, s Spec) (string, error) {
	if v := m.get(s.ID); v != nil {
		if a, ok := v.Attachment(); ok && v.Engine() != nil {
			return a.Device, nil
		}
		// A volume whose last stop failed half-way: finish it, then start.
		if err := v.Stop(ctx); err != nil {
			return "", fmt.Errorf("finish stopping: %w", err)
		}
		m.forget(s.ID, v)
	}
	if err := os.MkdirAll(m.RunDir, 0o700); err != nil {
		return "", fmt.Errorf("run dir: %w", err)
	}
	cfg := m.config(s)
	if m.Devices != nil {
		c, b, err := m.Devices(s)
		if err != nil {
			return "", err
		}
		cfg.Cache, cfg.Backing = c, b
	}
	v, err := Start(ctx, cfg)
	if err != nil {
		return "", err
	}
	m.mu.Lock()
	if m.vols == nil {
		m.vols = map[string]*Volume{}
	}
	m.vols[s.ID] = v
	m.mu.Unlock()
	a, _ := v.Attachment()
	klog.InfoS("Volume running", "volume", s.ID, "device", a.Device, "method", a.Method,
		"size", v.Engine().Size(), "backing", s.BackingPath, "cache", s.CachePath)
	return a.Device, nil
}

func (m *Manager) forget(id string, v *Volume) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.vols[id] == v {
		delete(m.vols, id)
	}
}

// Unstage detaches the device (the filesystem must be unmounted), stops
// serving and closes the engine cleanly. Unknown volumes are not an error;
// a device recorded for a volume that is not running (it did not come back
// after a restart) is detached. After a failure, calling it again resumes
// where it stopped.
func (m *Manager) Unstage(ctx context.Context, id string, device string) error {
	v := m.get(id)
	if v == nil {
		if device == "" {
			return nil
		}
		att := m.Attacher
		if att == nil {
			att = SystemAttacher{}
		}
		if err := att.Detach(ctx, m.AttachStateDir, device); err != nil {
			return fmt.Errorf("detach %s: %w", device, err)
		}
		return nil
	}
	if err := v.Stop(ctx); err != nil {
		return err
	}
	m.forget(id, v)
	return nil
}

// Grow grows a running volume to size bytes, live (Volume.Grow), and
// returns its device. The backing's storage must have grown first.
func (m *Manager) Grow(ctx context.Context, id string, size int64) (string, error) {
	v := m.get(id)
	if v == nil || v.Engine() == nil {
		return "", fmt.Errorf("volume %s is not running", id)
	}
	if err := v.Grow(ctx, size); err != nil {
		return "", err
	}
	a, _ := v.Attachment()
	return a.Device, nil
}

// Drain writes back every dirty block of a running volume to its backing
// device, so the backing holds all the data on its own.
func (m *Manager) Drain(ctx context.Context, id string) error {
	v := m.get(id)
	if v == nil || v.Engine() == nil {
		return fmt.Errorf("volume %s is not running", id)
	}
	return v.Engine().Drain(ctx, nil)
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
	v := m.get(id)
	if v == nil {
		return Info{}, false
	}
	eng := v.Engine()
	if eng == nil {
		return Info{}, false
	}
	a, _ := v.Attachment()
	return Info{Device: a.Device, Method: a.Method, Size: eng.Size(), Status: eng.Status(), Err: eng.Err()}, true
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

func (m *Manager) all() map[string]*Volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]*Volume, len(m.vols))
	for id, v := range m.vols {
		out[id] = v
	}
	return out
}

// FlushAll makes every acknowledged write of every running volume durable
// on its cache device.
func (m *Manager) FlushAll() error {
	var errs []error
	for id, v := range m.all() {
		if eng := v.Engine(); eng != nil {
			if err := eng.Flush(); err != nil {
				errs = append(errs, fmt.Errorf("flush %s: %w", id, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Shutdown is the graceful stop of the plugin: every engine is flushed and
// closed cleanly, but devices stay attached (pods keep their mounts; the
// next plugin process re-adopts them) and the buffers stay in place.
func (m *Manager) Shutdown() error {
	m.mu.Lock()
	vs := m.vols
	m.vols = map[string]*Volume{}
	m.mu.Unlock()
	var errs []error
	for id, v := range vs {
		if err := v.Release(context.Background()); err != nil {
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
