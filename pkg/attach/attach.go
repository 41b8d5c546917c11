// Package attach publishes a served volume (an NBD export on a unix socket)
// as a block device on the node, for the CSI plugin to format and mount.
//
// Three methods, chosen in this order:
//
//   - kernel-netlink: the kernel nbd driver configured over generic netlink
//     (family "nbd"). The kernel owns the sockets, so the device outlives
//     the attaching process; the backend identifier (the volume id, shown in
//     /sys/block/nbdX/backend) lets a restarted server find its device and
//     hand it fresh sockets with RECONFIGURE (Reattach) while the kernel
//     holds and requeues I/O for up to the dead-connection timeout. The
//     transmission flags passed are exactly those the server advertised, so
//     the kernel sends FLUSH and FUA.
//   - kernel-ioctl: the legacy ioctl interface, for kernels whose nbd has no
//     netlink family. The device lives only while this process blocks in
//     NBD_DO_IT; no reattach.
//   - nbdfuse-loop: no kernel nbd at all (these machines, CI). nbdfuse
//     (libnbd) exposes the export as a file on a private FUSE mount and a
//     loop device (direct I/O where accepted) turns it into a block device.
//     Flushes reach the server (see fallback.go). nbdfuse itself dies with
//     its server connection; with Options.RelayCommand it talks through a
//     relay (relay.go) that reconnects and resends unanswered requests, so
//     a mounted filesystem survives a server restart on this path too.
//
// Every attachment is recorded atomically as a small JSON file in the
// caller's state directory, so Detach works after a restart of the attaching
// process.
package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Attachment methods.
const (
	MethodNetlink  = "kernel-netlink"
	MethodIoctl    = "kernel-ioctl"
	MethodFallback = "nbdfuse-loop"
)

// Attachment describes a volume published as a block device.
type Attachment struct {
	Device      string `json:"device"` // /dev/nbdX or /dev/loopX
	Method      string `json:"method"`
	VolumeID    string `json:"volumeId"`
	Socket      string `json:"socket"`
	Export      string `json:"export"`
	Size        int64  `json:"size"`
	Flags       uint16 `json:"flags"` // transmission flags the server advertised
	Connections int    `json:"connections,omitempty"`
	Index       int    `json:"index,omitempty"`  // nbd device index (kernel methods)
	Detail      string `json:"detail,omitempty"` // e.g. the loop mode used
}

// Options for Attach.
type Options struct {
	Socket   string // NBD server's unix socket (required)
	Export   string // export name ("" = the server's default)
	VolumeID string // backend identifier and state key (required)
	StateDir string // where attachment records live (required)
	// Timeout is the kernel's per-request I/O timeout and bounds the
	// handshake and device setup. Default 30s.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O when a connection dies,
	// waiting for Reattach, before failing it. Default 2m.
	DeadConnTimeout time.Duration
	// Connections to open when the server allows several (CAN_MULTI_CONN);
	// 0 = min(CPUs, 4).
	Connections int
	// PreferMethod forces a method ("" = the best available).
	PreferMethod string
	ReadOnly     bool
	// RelayCommand, on the nbdfuse-loop path, is the command line (program
	// and leading arguments) that runs ServeRelay on stdin/stdout, e.g.
	// {"/usr/bin/writeboost", "nbd-relay"}. nbdfuse then talks to the server
	// through the relay, which reconnects and resends unanswered requests
	// when the server restarts, so mounted filesystems survive it. Empty:
	// nbdfuse connects directly and dies with the server's connection.
	RelayCommand []string
}

// relayArgs are the arguments appended to Options.RelayCommand.
func relayArgs(o Options) []string {
	return []string{"--socket", o.Socket, "--export", o.Export, "--dead-conn-timeout", o.DeadConnTimeout.String(),
		"--ceiling", strconv.FormatUint(FallbackCeiling, 10)}
}

func (o Options) handshakeTimeout() time.Duration {
	if o.Timeout > 0 {
		return o.Timeout
	}
	return 30 * time.Second
}

func (o *Options) validate() error {
	var errs []error
	if o.Socket == "" {
		errs = append(errs, errors.New("socket is required"))
	}
	if o.VolumeID == "" {
		errs = append(errs, errors.New("volume id is required"))
	} else if strings.ContainsAny(o.VolumeID, "\x00\n") || len(o.VolumeID) > 255 {
		errs = append(errs, fmt.Errorf("volume id %q: no NUL or newline, at most 255 bytes", o.VolumeID))
	}
	if o.StateDir == "" {
		errs = append(errs, errors.New("state dir is required"))
	}
	switch o.PreferMethod {
	case "", MethodNetlink, MethodIoctl, MethodFallback:
	default:
		errs = append(errs, fmt.Errorf("unknown method %q", o.PreferMethod))
	}
	if o.Timeout < 0 || o.DeadConnTimeout < 0 || o.Connections < 0 {
		errs = append(errs, errors.New("timeouts and connections must not be negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("attach options: %w", err)
	}
	if o.DeadConnTimeout == 0 {
		o.DeadConnTimeout = 2 * time.Minute
	}
	var err error
	if o.StateDir, err = filepath.Abs(o.StateDir); err != nil {
		return err
	}
	if o.Socket, err = filepath.Abs(o.Socket); err != nil {
		return err
	}
	return nil
}

// ErrAlreadyAttached is returned when the volume already has a live
// attachment recorded in the state dir.
var ErrAlreadyAttached = errors.New("volume already attached")

// Attach publishes the export as a block device with the best available
// method (or o.PreferMethod).
func Attach(ctx context.Context, o Options) (*Attachment, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	unlock, err := lockVolume(ctx, o.StateDir, o.VolumeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if st, err := loadState(o.StateDir, o.VolumeID); err == nil {
		if stateAlive(st) {
			return &st.Attachment, fmt.Errorf("%w: volume %q on %s (%s)", ErrAlreadyAttached, o.VolumeID, st.Device, st.Method)
		}
		klog.InfoS("Clearing a stale attachment record", "volume", o.VolumeID, "device", st.Device, "method", st.Method)
		if err := detachState(ctx, o.StateDir, st); err != nil {
			return nil, fmt.Errorf("clear stale attachment of %q: %w", o.VolumeID, err)
		}
	}
	if o.PreferMethod != MethodFallback && kernelNBDLoaded() {
		// The record may be gone (a wiped state dir) while the kernel still
		// has the device: never CONNECT a second device for one volume.
		if idx, err := findByBackend(o.VolumeID); err == nil {
			a := &Attachment{Device: "/dev/nbd" + strconv.Itoa(idx), Method: MethodNetlink, VolumeID: o.VolumeID, Index: idx, Socket: o.Socket, Export: o.Export}
			return a, fmt.Errorf("%w: volume %q on %s (found by backend identifier; use Reattach)", ErrAlreadyAttached, o.VolumeID, a.Device)
		}
	}
	a, err := attach(ctx, o)
	if err != nil {
		return nil, err
	}
	if a.Method != MethodFallback { // the fallback saved its richer record itself
		if err := saveState(o.StateDir, &state{Attachment: *a}); err != nil {
			_ = detachKernel(a)
			return nil, err
		}
	}
	klog.InfoS("attached", "method", a.Method, "device", a.Device, "volume", a.VolumeID,
		"socket", a.Socket, "export", a.Export, "size", a.Size, "flags", fmt.Sprintf("%#x", a.Flags),
		"connections", a.Connections, "detail", a.Detail)
	return a, nil
}

func attach(ctx context.Context, o Options) (*Attachment, error) {
	if o.PreferMethod == MethodFallback {
		return attachFallback(ctx, o)
	}
	kerr := ensureKernelNBD()
	if kerr == nil {
		if o.PreferMethod != MethodIoctl {
			nl, err := dialNBDNetlink()
			if err == nil {
				defer nl.Close()
				return attachNetlink(ctx, nl, o)
			}
			if o.PreferMethod == MethodNetlink {
				return nil, err
			}
			klog.InfoS("No nbd netlink family; using the ioctl interface", "err", err)
		}
		return attachIoctl(ctx, o)
	}
	if o.PreferMethod != "" {
		return nil, fmt.Errorf("method %s: %w", o.PreferMethod, kerr)
	}
	klog.InfoS("Kernel has no nbd driver; falling back to nbdfuse and a loop device", "volume", o.VolumeID)
	return attachFallback(ctx, o)
}

// stateAlive reports whether a recorded attachment still works.
func stateAlive(st *state) bool {
	switch st.Method {
	case MethodFallback:
		return fallbackAlive(st)
	case MethodNetlink, MethodIoctl:
		idx, err := findByBackend(st.VolumeID)
		if err == nil && idx == st.Index {
			return true
		}
		sz, err := deviceSize("nbd" + strconv.Itoa(st.Index))
		return st.Method == MethodIoctl && err == nil && sz > 0
	}
	return false
}

// Detach undoes an attachment given its device path (/dev/nbdX, /dev/loopX).
// It refuses (ErrBusy) while a filesystem on the device is mounted in this
// mount namespace. Detaching a device that is
// already gone only clears its record.
func Detach(ctx context.Context, stateDir, device string) error {
	if stateDir != "" {
		st, err := findStateByDevice(stateDir, device)
		if err == nil {
			unlock, err := lockVolume(ctx, stateDir, st.VolumeID)
			if err != nil {
				return err
			}
			defer unlock()
			// Re-read under the lock: a concurrent detach may have won.
			if st, err = loadState(stateDir, st.VolumeID); err != nil || st.Device != device {
				if err == nil || errors.Is(err, os.ErrNotExist) {
					return nil
				}
				return err
			}
			return detachState(ctx, stateDir, st)
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	// Not recorded: a kernel nbd device can still be disconnected.
	if strings.HasPrefix(filepath.Base(device), "nbd") {
		idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(device), "nbd"))
		if err != nil {
			return fmt.Errorf("detach %s: not an nbd device name", device)
		}
		if mp := mountedAt(device); mp != "" {
			return fmt.Errorf("detach %s: %w on %s; unmount it first", device, ErrBusy, mp)
		}
		return detachKernel(&Attachment{Device: device, Method: MethodNetlink, Index: idx})
	}
	return fmt.Errorf("detach %s: %w (no record in %q)", device, ErrNotAttached, stateDir)
}

// ErrNotAttached is returned by Detach for a device with no attachment
// record (already detached, or never attached here); idempotent callers
// treat it as success.
var ErrNotAttached = errors.New("not attached")

// ErrBusy is returned by Detach while a filesystem on the device is mounted.
var ErrBusy = errors.New("device is mounted")

// mountedAt returns a mount point of block device dev, or "" when none (or
// dev is gone). Detaching under a mounted filesystem would turn every later
// write of it into an I/O error.
func mountedAt(dev string) string {
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return ""
	}
	want := fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[2] == want {
			return unescapeMountPath(f[4])
		}
	}
	return ""
}

func detachState(ctx context.Context, stateDir string, st *state) error {
	if mp := mountedAt(st.Device); mp != "" && (st.Method != MethodFallback || backedBy(st.Device, st.BackingFile)) {
		return fmt.Errorf("detach %s: %w on %s; unmount it first", st.Device, ErrBusy, mp)
	}
	var err error
	switch st.Method {
	case MethodFallback:
		err = teardownFallback(ctx, st)
	default:
		err = detachKernel(&st.Attachment)
	}
	if err != nil {
		return fmt.Errorf("detach %s (%s): %w", st.Device, st.Method, err)
	}
	klog.InfoS("detached", "method", st.Method, "device", st.Device, "volume", st.VolumeID)
	return removeState(stateDir, st.VolumeID)
}

func detachKernel(a *Attachment) error {
	if a.Method == MethodIoctl {
		return detachIoctl(a.Device)
	}
	nl, err := dialNBDNetlink()
	if err != nil {
		// An ioctl-bound device of another process, or no nbd at all.
		if errors.Is(err, ErrNoNetlink) {
			return detachIoctl(a.Device)
		}
		return err
	}
	defer nl.Close()
	return nl.disconnect(a.Index)
}

// ErrReattachUnsupported is returned by Reattach for methods that cannot
// take new sockets: the ioctl interface (the device dies with its process)
// and the nbdfuse fallback (through the relay it reconnects by itself;
// without it nbdfuse exits when its server goes away).
var ErrReattachUnsupported = errors.New("this attachment method cannot reattach; detach and attach again")

// Reattach hands fresh connections from dial to the kernel device whose
// backend identifier is volumeID, after the server behind it restarted.
// The kernel replaces the connections it found dead and resumes the I/O it
// held. stateDir may be "" when no record is kept.
func Reattach(ctx context.Context, stateDir, volumeID string, dial Dialer, o Options) (*Attachment, error) {
	if stateDir != "" {
		unlock, err := lockVolume(ctx, stateDir, volumeID)
		if err != nil {
			return nil, err
		}
		defer unlock()
		if st, err := loadState(stateDir, volumeID); err == nil && st.Method != MethodNetlink {
			return nil, fmt.Errorf("reattach %q (%s on %s): %w", volumeID, st.Method, st.Device, ErrReattachUnsupported)
		}
	}
	if err := ensureKernelNBD(); err != nil {
		return nil, fmt.Errorf("reattach %q: %w", volumeID, err)
	}
	nl, err := dialNBDNetlink()
	if err != nil {
		return nil, fmt.Errorf("reattach %q: %w", volumeID, err)
	}
	defer nl.Close()
	if o.DeadConnTimeout == 0 {
		o.DeadConnTimeout = 2 * time.Minute
	}
	a, err := reattachNetlink(ctx, nl, volumeID, dial, o.Connections, o.Timeout, o.DeadConnTimeout)
	if err != nil {
		return nil, fmt.Errorf("reattach %q: %w", volumeID, err)
	}
	if stateDir != "" {
		if st, err := loadState(stateDir, volumeID); err == nil {
			a.Socket, a.Export = st.Socket, st.Export
		}
		if err := saveState(stateDir, &state{Attachment: *a}); err != nil {
			return a, err
		}
	}
	klog.InfoS("reattached", "method", a.Method, "device", a.Device, "volume", volumeID, "connections", a.Connections)
	return a, nil
}

// WatchLinkDead calls fn with the device of every nbd device the kernel
// reports as having lost a connection, until ctx ends. A serving process
// can use it to reattach as soon as a connection drops (nbd-client's
// -persist mode does the same).
func WatchLinkDead(ctx context.Context, fn func(device string)) error {
	return watchLinkDead(ctx, func(idx int) { fn("/dev/nbd" + strconv.Itoa(idx)) })
}
