package attach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// The fallback path, for kernels without nbd (these machines, CI):
//
//	server <-NBD/unix-> [relay <-NBD/socketpair->] nbdfuse (libnbd)
//	       -> FUSE file MOUNTDIR/disk -> loop device (the block device)
//
// Flushes reach the server: the loop driver turns a block-layer FLUSH (and
// FUA, which it does not advertise, so the block layer turns it into
// write+flush) into fsync of its backing file; FUSE passes fsync to nbdfuse,
// which sends NBD_CMD_FLUSH. TestFallbackFilesystemRoundTrip proves it by
// counting flushes on the server for sync and for an fsync.
//
// nbdfuse (libnbd 1.14) does not reconnect. Connected directly, when the
// server's connection drops nbdfuse exits, the FUSE file disappears and
// every I/O on the loop device fails: a mounted filesystem does not survive
// a server restart (TestFallbackServerRestartBreaksIO). With
// Options.RelayCommand nbdfuse runs the relay (relay.go) as its server, and
// the relay reconnects and resends unanswered requests while I/O waits, for
// up to the dead-connection timeout: the filesystem survives
// (TestFallbackRelaySurvivesServerKill). Either way nbdfuse and the relay
// are a process chain of their own (own session, outside the attaching and
// the serving process, and outside the plugin pod's cgroups: cgroup.go);
// killing them still breaks the device. The relay costs throughput: it is
// one connection where nbdfuse alone uses several (multi-conn), and one more
// copy; measured against direct nbdfuse on nbdkit memory, 4K random I/O at
// QD16 ran at 0.6-0.9x and 1 MiB sequential at QD4 at about 0.35x.
//
// Growing a volume live (Resize): nbdfuse fixes its file's size when it
// starts, so through the relay it is told a size of FallbackCeiling, far
// beyond any volume, and the loop device is bounded by its sizelimit to
// the volume's size: the pod never sees a byte beyond it. Resize raises
// the sizelimit (LOOP_SET_STATUS64, then LOOP_SET_CAPACITY) once the
// engine has grown. The sizelimit lives in the kernel's loop device, so it
// survives a restart of the plugin; the record keeps the ceiling. Direct
// nbdfuse (no relay) sees the export's own size and cannot grow live.

const diskFile = "disk"

// nbdfuseURI builds the NBD URI nbdfuse connects to.
func nbdfuseURI(socket, export string) string {
	u := url.URL{Scheme: "nbd+unix", Path: "/" + export, RawQuery: "socket=" + url.QueryEscape(socket)}
	return u.String()
}

func attachFallback(ctx context.Context, o Options) (_ *Attachment, err error) {
	for _, tool := range []string{"nbdfuse", "losetup", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("fallback attach needs %s: %w", tool, err)
		}
	}
	// Check the export first: a clear handshake error beats a FUSE file
	// that never appears.
	c, info, err := dialExport(o.Socket, o.Export, o.handshakeTimeout())
	if err != nil {
		return nil, err
	}
	c.Close()
	if info.Flags&nbdproto.FlagSendFlush == 0 {
		klog.InfoS("Server does not advertise flush: fsync on the device will not reach it", "socket", o.Socket)
	}

	mnt := filepath.Join(o.StateDir, "fuse", strings.TrimSuffix(stateName(o.VolumeID), ".json"))
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return nil, fmt.Errorf("fuse mount dir: %w", err)
	}
	st := &state{MountDir: mnt, BackingFile: filepath.Join(mnt, diskFile), Ceiling: int64(info.Size)}
	if len(o.RelayCommand) > 0 {
		st.Ceiling = int64(max(info.Size, FallbackCeiling))
	}
	st.Attachment = Attachment{
		Method: MethodFallback, VolumeID: o.VolumeID, Socket: o.Socket, Export: o.Export,
		Size: int64(info.Size), Flags: info.Flags,
	}
	defer func() {
		if err != nil {
			if cerr := teardownFallback(context.Background(), st); cerr != nil {
				klog.ErrorS(cerr, "Cleaning up a failed fallback attach", "volume", o.VolumeID)
			}
		}
	}()

	logf, err := os.OpenFile(nbdfuseLog(mnt), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	args := []string{}
	if o.ReadOnly {
		args = append(args, "--readonly")
	}
	if len(o.RelayCommand) > 0 {
		args = append(args, st.BackingFile, "--command")
		args = append(args, o.RelayCommand...)
		args = append(args, relayArgs(o)...)
	} else {
		args = append(args, st.BackingFile, nbdfuseURI(o.Socket, o.Export))
	}
	cmd := exec.Command("nbdfuse", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: nbdfuse must outlive this process (and its signals)
	// so the device stays up across a restart of the attaching process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start nbdfuse: %w", err)
	}
	st.NbdfusePID = cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reap it whenever it exits

	deadline := time.Now().Add(o.handshakeTimeout())
	for {
		if fi, err := os.Stat(st.BackingFile); err == nil && fi.Size() == st.Ceiling {
			break
		}
		select {
		case werr := <-exited:
			st.NbdfusePID = 0
			return nil, fmt.Errorf("nbdfuse exited before the file appeared: %v (log %s)", werr, logf.Name())
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("nbdfuse: %s did not appear within %s", st.BackingFile, o.handshakeTimeout())
		}
	}

	// The relay is running once the file has appeared: nbdfuse and it can
	// leave the pod's cgroups together (cgroup.go), so the device outlives
	// a restart of the plugin's pod.
	left := leavePodCgroups(processTree(cmd.Process.Pid))
	if left != nil {
		klog.ErrorS(left, "nbdfuse stays in the plugin's cgroups: the device will not survive a restart of the plugin's pod", "volumeID", o.VolumeID)
	}

	dev, how, err := loopSetup(ctx, st.BackingFile, int64(info.Size), o.ReadOnly)
	if err != nil {
		return nil, err
	}
	st.Device, st.Detail = dev, how
	// The file may be the ceiling: never hand out a device bigger than
	// the volume.
	if got, err := deviceSize(filepath.Base(dev)); err != nil || got != int64(info.Size) {
		return nil, fmt.Errorf("loop device %s over %s: %d bytes (%v), want the volume's %d", dev, st.BackingFile, got, err, info.Size)
	}
	if len(o.RelayCommand) > 0 {
		st.Detail += ", through a reconnecting relay"
	} else {
		st.Detail += ", direct (does not survive a server restart)"
	}
	if left != nil {
		st.Detail += ", in the plugin pod's cgroups (does not survive its restart)"
	}
	if err := saveState(o.StateDir, st); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Loop device over nbdfuse", "device", dev, "loop", how, "file", st.BackingFile)
	a := st.Attachment
	return &a, nil
}

// loopSetup puts a loop device of size bytes over file (its sizelimit:
// the file may be bigger, up to the ceiling): direct I/O (no second page
// cache between the filesystem and the server) and 4096-byte sectors (the
// engine's block) where the kernel accepts them, else what it does accept.
func loopSetup(ctx context.Context, file string, size int64, readOnly bool) (dev, how string, err error) {
	tries := []struct {
		how  string
		args []string
	}{
		{"direct-io, 4096-byte sectors", []string{"--direct-io=on", "--sector-size", "4096"}},
		{"direct-io, 512-byte sectors", []string{"--direct-io=on"}},
		{"buffered", nil},
	}
	var errs []error
	for _, t := range tries {
		args := append([]string{"--find", "--show", "--sizelimit", strconv.FormatInt(size, 10)}, t.args...)
		if readOnly {
			args = append(args, "--read-only")
		}
		args = append(args, file)
		out, err := runCmd(ctx, "losetup", args...)
		if err == nil {
			return strings.TrimSpace(out), t.how, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", t.how, err))
		klog.InfoS("losetup refused a mode; trying the next", "mode", t.how, "err", err)
	}
	return "", "", fmt.Errorf("losetup %s: %w", file, errors.Join(errs...))
}

func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// teardownFallback undoes whatever of a fallback attach exists: loop device,
// FUSE mount, nbdfuse, directory. It is safe to repeat.
func teardownFallback(ctx context.Context, st *state) error {
	var errs []error
	if st.Device != "" {
		if backedBy(st.Device, st.BackingFile) {
			if _, err := runCmd(ctx, "losetup", "-d", st.Device); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if st.MountDir != "" && isMountPoint(st.MountDir) {
		if _, err := runCmd(ctx, "fusermount3", "-u", st.MountDir); err != nil {
			// Busy (the loop device may still hold the file while the kernel
			// finishes its rundown): detach lazily.
			if _, err2 := runCmd(ctx, "fusermount3", "-u", "-z", st.MountDir); err2 != nil {
				errs = append(errs, err, err2)
			}
		}
	}
	if st.NbdfusePID > 0 && isNbdfuse(st.NbdfusePID, st.MountDir) {
		p, _ := os.FindProcess(st.NbdfusePID)
		_ = p.Signal(syscall.SIGTERM)
		for i := 0; i < 500 && isNbdfuse(st.NbdfusePID, st.MountDir); i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if isNbdfuse(st.NbdfusePID, st.MountDir) {
			_ = p.Signal(syscall.SIGKILL)
		}
	}
	if st.MountDir != "" && !isMountPoint(st.MountDir) {
		if err := os.Remove(st.MountDir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		if len(errs) == 0 {
			_ = os.Remove(nbdfuseLog(st.MountDir))
		}
	}
	return errors.Join(errs...)
}

// backedBy reports whether loop device dev is still bound to file, so a
// device number reused by someone else is never detached.
func backedBy(dev, file string) bool {
	b, err := os.ReadFile(filepath.Join(sysBlock, filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return false
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)") == file
}

// isNbdfuse checks pid is our nbdfuse (and not a reused pid) by its command
// line, and not a zombie.
func isNbdfuse(pid int, mountDir string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || len(b) == 0 {
		return false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if filepath.Base(args[0]) != "nbdfuse" {
		return false
	}
	for _, a := range args[1:] {
		if strings.HasPrefix(a, mountDir+"/") {
			return true
		}
	}
	return false
}

// isMountPoint reports whether dir is listed in /proc/self/mountinfo.
func isMountPoint(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && unescapeMountPath(f[4]) == dir {
			return true
		}
	}
	return false
}

// unescapeMountPath undoes mountinfo's octal escaping of space, tab,
// newline and backslash.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// fallbackAlive reports whether the chain is intact: nbdfuse running and the
// loop device still bound to its file.
func fallbackAlive(st *state) bool {
	return isNbdfuse(st.NbdfusePID, st.MountDir) && backedBy(st.Device, st.BackingFile)
}

// nbdfuseLog is where nbdfuse's output goes, next to its mount dir.
func nbdfuseLog(mountDir string) string { return mountDir + ".log" }
