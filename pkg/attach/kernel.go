package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// chooseBlockSize picks the kernel block size: 4096 so the engine never
// sees unaligned I/O from the kernel, unless the export's size or the
// server's block size limits rule it out, then 512.
func chooseBlockSize(info nbdproto.ExportInfo) uint64 {
	ok4k := info.Size%4096 == 0 &&
		(info.MinBlock == 0 || info.MinBlock <= 4096) &&
		(info.MaxBlock == 0 || info.MaxBlock >= 4096)
	if ok4k {
		return 4096
	}
	return 512
}

// Dialer opens one connection to the export and negotiates it up to the
// transmission phase.
type Dialer func(ctx context.Context) (*net.UnixConn, nbdproto.ExportInfo, error)

// UnixDialer dials export on a unix socket, bounding each handshake by
// timeout.
func UnixDialer(socket, export string, timeout time.Duration) Dialer {
	return func(ctx context.Context) (*net.UnixConn, nbdproto.ExportInfo, error) {
		t := timeout
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < t {
			t = time.Until(dl)
		}
		if t <= 0 {
			return nil, nbdproto.ExportInfo{}, context.DeadlineExceeded
		}
		return dialExport(socket, export, t)
	}
}

// dialN opens n connections (n counted after the first told us the flags),
// checking that every connection sees the same export.
func dialN(ctx context.Context, dial Dialer, requested int) ([]*net.UnixConn, nbdproto.ExportInfo, error) {
	first, info, err := dial(ctx)
	if err != nil {
		return nil, info, err
	}
	conns := []*net.UnixConn{first}
	n := connectionCount(info.Flags, requested, runtime.NumCPU())
	for len(conns) < n {
		c, ci, err := dial(ctx)
		if err == nil && (ci.Size != info.Size || ci.Flags != info.Flags) {
			c.Close()
			err = fmt.Errorf("connection %d sees size %d flags %#x, the first saw %d %#x", len(conns), ci.Size, ci.Flags, info.Size, info.Flags)
		}
		if err != nil {
			closeAll(conns)
			return nil, info, err
		}
		conns = append(conns, c)
	}
	return conns, info, nil
}

func closeAll(conns []*net.UnixConn) {
	for _, c := range conns {
		c.Close()
	}
}

// socketFDs duplicates the connections' descriptors for handing to the
// kernel. The kernel takes its own reference, so after the call both the
// duplicates and the Go connections are closed by the caller.
func socketFDs(conns []*net.UnixConn) ([]*os.File, error) {
	var files []*os.File
	for _, c := range conns {
		f, err := c.File()
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, fmt.Errorf("socket fd: %w", err)
		}
		files = append(files, f)
	}
	return files, nil
}

func fdsOf(files []*os.File) []int {
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	return fds
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

func secondsCeil(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

// attachNetlink connects the export to a free nbd device over netlink. The
// kernel owns the sockets afterwards: the device outlives this process, and
// a restarted server hands it new sockets with Reattach.
func attachNetlink(ctx context.Context, nl *nlClient, o Options) (*Attachment, error) {
	conns, info, err := dialN(ctx, UnixDialer(o.Socket, o.Export, o.handshakeTimeout()), o.Connections)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	flags, err := kernelServerFlags(info.Flags, o.ReadOnly)
	if err != nil {
		return nil, err
	}
	files, err := socketFDs(conns)
	if err != nil {
		return nil, err
	}
	defer closeFiles(files)
	idx, err := nl.connect(connectRequest{
		Index:       -1,
		SizeBytes:   info.Size,
		BlockSize:   chooseBlockSize(info),
		TimeoutSec:  secondsCeil(o.Timeout),
		DeadConnSec: secondsCeil(o.DeadConnTimeout),
		ServerFlags: flags,
		Backend:     o.VolumeID,
		FDs:         fdsOf(files),
	})
	if err != nil {
		return nil, err
	}
	a := &Attachment{
		Device: "/dev/nbd" + strconv.Itoa(idx), Method: MethodNetlink, VolumeID: o.VolumeID,
		Socket: o.Socket, Export: o.Export, Size: int64(info.Size), Flags: info.Flags,
		Connections: len(conns), Index: idx,
	}
	finishKernelAttach(a, info.Flags)
	return a, nil
}

func finishKernelAttach(a *Attachment, flags uint16) {
	name := "nbd" + strconv.Itoa(a.Index)
	if err := raiseMaxSectors(name); err != nil {
		klog.InfoS("Could not raise max_sectors_kb; large I/O will be split", "device", a.Device, "err", err)
	}
	if m := missingFeatures(flags); len(m) > 0 {
		klog.InfoS("Server does not advertise some features; the kernel will not send them", "device", a.Device, "missing", m)
	}
}

// reattachNetlink hands fresh sockets to the device carrying volumeID. The
// kernel replaces only connections it has marked dead and requeues the I/O
// it held meanwhile; surplus sockets are refused quietly (ENOSPC) and closed
// here.
func reattachNetlink(ctx context.Context, nl *nlClient, volumeID string, dial Dialer, connections int, timeout, deadConn time.Duration) (*Attachment, error) {
	idx, err := findByBackend(volumeID)
	if err != nil {
		return nil, err
	}
	conns, info, err := dialN(ctx, dial, connections)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	size, err := deviceSize("nbd" + strconv.Itoa(idx))
	if err == nil && size != 0 && uint64(size) > info.Size {
		// Another export (or a shrunk one) behind the same id: refuse
		// rather than show the filesystem above a different disk. A
		// bigger export is this volume grown while its server was away:
		// the device takes the new size after the sockets.
		return nil, fmt.Errorf("nbd%d has %d bytes, the export now has %d: refusing to reattach", idx, size, info.Size)
	}
	files, err := socketFDs(conns)
	if err != nil {
		return nil, err
	}
	defer closeFiles(files)
	if err := nl.reconfigure(connectRequest{
		Index: idx, Backend: volumeID, FDs: fdsOf(files),
		TimeoutSec: secondsCeil(timeout), DeadConnSec: secondsCeil(deadConn),
	}); err != nil {
		return nil, err
	}
	if err == nil && size != 0 && uint64(size) < info.Size {
		if err := nl.resize(idx, info.Size, volumeID); err != nil {
			return nil, err
		}
		klog.InfoS("Reattached device grown to the export's size", "device", "nbd"+strconv.Itoa(idx), "from", size, "to", info.Size)
	}
	return &Attachment{
		Device: "/dev/nbd" + strconv.Itoa(idx), Method: MethodNetlink, VolumeID: volumeID,
		Size: int64(info.Size), Flags: info.Flags, Connections: len(conns), Index: idx,
	}, nil
}

// Linux ioctls on /dev/nbdX, from include/uapi/linux/nbd.h: _IO(0xab, n).
const (
	nbdSetSock       = 0xab00
	nbdSetBlksize    = 0xab01
	nbdDoIt          = 0xab03
	nbdClearSock     = 0xab04
	nbdSetSizeBlocks = 0xab07
	nbdDisconnect    = 0xab08
	nbdSetTimeout    = 0xab09
	nbdSetFlags      = 0xab0a
)

// ioctlDevice is an nbd device bound with the legacy ioctl interface: the
// device lives only as long as the goroutine blocked in NBD_DO_IT, so only
// as long as this process.
type ioctlDevice struct {
	f    *os.File
	done chan error
}

var ioctlDevices = struct {
	sync.Mutex
	m map[string]*ioctlDevice
}{m: map[string]*ioctlDevice{}}

func ioctl(f *os.File, req, arg uintptr) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, arg)
	if e != 0 {
		return e
	}
	return nil
}

// attachIoctl binds the export to a free /dev/nbdX with the ioctl
// interface, for kernels without the netlink family. Unlike go-nbd's client
// it calls NBD_SET_FLAGS: without it the kernel believes the server has no
// write cache and never sends FLUSH, so fsync would reach nobody.
func attachIoctl(ctx context.Context, o Options) (*Attachment, error) {
	conns, info, err := dialN(ctx, UnixDialer(o.Socket, o.Export, o.handshakeTimeout()), o.Connections)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	flags, err := kernelServerFlags(info.Flags, o.ReadOnly)
	if err != nil {
		return nil, err
	}
	bs := chooseBlockSize(info)
	var dev *os.File
	var idx int
	for i := 0; i < 256 && dev == nil; i++ {
		name := "nbd" + strconv.Itoa(i)
		if _, err := os.Stat("/dev/" + name); err != nil {
			break
		}
		if sz, err := deviceSize(name); err != nil || sz != 0 {
			continue
		}
		if _, err := os.Stat(sysBlock + "/" + name + "/pid"); err == nil {
			continue // bound by someone, size not yet set
		}
		f, err := os.OpenFile("/dev/"+name, os.O_RDWR, 0)
		if err != nil {
			continue
		}
		dev, idx = f, i
	}
	if dev == nil {
		return nil, errors.New("no free /dev/nbdX for the ioctl interface")
	}
	fail := func(err error) (*Attachment, error) {
		_ = ioctl(dev, nbdClearSock, 0)
		dev.Close()
		return nil, err
	}
	steps := []struct {
		name string
		req  uintptr
		arg  uintptr
	}{
		{"NBD_SET_BLKSIZE", nbdSetBlksize, uintptr(bs)},
		{"NBD_SET_SIZE_BLOCKS", nbdSetSizeBlocks, uintptr(info.Size / bs)},
		{"NBD_SET_FLAGS", nbdSetFlags, uintptr(flags)},
	}
	if t := secondsCeil(o.Timeout); t > 0 {
		steps = append(steps, struct {
			name string
			req  uintptr
			arg  uintptr
		}{"NBD_SET_TIMEOUT", nbdSetTimeout, uintptr(t)})
	}
	for _, s := range steps {
		if err := ioctl(dev, s.req, s.arg); err != nil {
			return fail(fmt.Errorf("%s on /dev/nbd%d: %w", s.name, idx, err))
		}
	}
	files, err := socketFDs(conns)
	if err != nil {
		return fail(err)
	}
	defer closeFiles(files)
	for _, f := range files {
		if err := ioctl(dev, nbdSetSock, f.Fd()); err != nil {
			return fail(fmt.Errorf("NBD_SET_SOCK on /dev/nbd%d: %w", idx, err))
		}
	}
	d := &ioctlDevice{f: dev, done: make(chan error, 1)}
	go func() {
		// NBD_DO_IT returns only when the device is disconnected.
		runtime.LockOSThread()
		err := ioctl(dev, nbdDoIt, 0)
		_ = ioctl(dev, nbdClearSock, 0)
		// dev stays open: detachIoctl may still be using it; it closes it.
		d.done <- err
		close(d.done)
	}()
	a := &Attachment{
		Device: "/dev/nbd" + strconv.Itoa(idx), Method: MethodIoctl, VolumeID: o.VolumeID,
		Socket: o.Socket, Export: o.Export, Size: int64(info.Size), Flags: info.Flags,
		Connections: len(conns), Index: idx,
	}
	// Wait for the size to show, or for NBD_DO_IT to fail at once.
	deadline := time.Now().Add(o.handshakeTimeout())
	for {
		if sz, _ := deviceSize("nbd" + strconv.Itoa(idx)); sz > 0 {
			break
		}
		select {
		case err := <-d.done:
			dev.Close()
			return nil, fmt.Errorf("NBD_DO_IT on %s: %w", a.Device, err)
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = ioctl(dev, nbdDisconnect, 0)
			<-d.done
			dev.Close()
			return nil, fmt.Errorf("%s did not come up", a.Device)
		}
	}
	ioctlDevices.Lock()
	ioctlDevices.m[a.Device] = d
	ioctlDevices.Unlock()
	finishKernelAttach(a, info.Flags)
	return a, nil
}

func detachIoctl(device string) error {
	ioctlDevices.Lock()
	d := ioctlDevices.m[device]
	delete(ioctlDevices.m, device)
	ioctlDevices.Unlock()
	if d == nil {
		// Bound by another process (that process must still be alive, since
		// the device dies with its NBD_DO_IT): ask the kernel directly.
		f, err := os.OpenFile(device, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		return ioctl(f, nbdDisconnect, 0)
	}
	defer d.f.Close()
	select {
	case <-d.done: // already disconnected (the server went away)
		return nil
	default:
	}
	if err := ioctl(d.f, nbdDisconnect, 0); err != nil {
		return fmt.Errorf("NBD_DISCONNECT %s: %w", device, err)
	}
	<-d.done
	return nil
}
