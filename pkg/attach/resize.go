package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// FallbackCeiling is the size nbdfuse's file is given on the fallback path
// through the relay (1 PiB): the most such an attachment can grow to live.
const FallbackCeiling = 1 << 50

// ErrResizeUnsupported is returned by Resize for attachments that cannot
// change size live: the ioctl interface, and fallback attachments made
// without the relay (or before online growth existed). Detach and attach
// again to see the new size.
var ErrResizeUnsupported = errors.New("this attachment cannot change size live; detach and attach again")

// Resize makes the attached device of volumeID size bytes as the kernel
// sees it, after the volume behind the export grew (it never shrinks a
// device: a smaller size is refused). Repeating it is harmless.
//
//   - kernel-netlink: NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES. Linux
//     (5.3 and later, 6.1 included) applies a new size to a live device
//     (nbd_genl_size_set -> nbd_set_size -> set_capacity_and_notify),
//     proven in the real-kernel tier by TestKernelResize.
//   - nbdfuse-loop: the loop device's sizelimit goes up (LOOP_SET_STATUS64,
//     LOOP_SET_CAPACITY) within nbdfuse's file, whose size is the ceiling
//     (fallback.go).
//
// The device's size is read back from sysfs: the record changes only
// once the kernel shows the new size.
func Resize(ctx context.Context, stateDir, volumeID string, size int64) (*Attachment, error) {
	if size <= 0 || size%512 != 0 {
		return nil, fmt.Errorf("resize %q: size %d is not a positive multiple of 512", volumeID, size)
	}
	unlock, err := lockVolume(ctx, stateDir, volumeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := loadState(stateDir, volumeID)
	if err != nil {
		return nil, fmt.Errorf("resize %q: %w", volumeID, err)
	}
	name := filepath.Base(st.Device)
	have, err := deviceSize(name)
	if err != nil {
		return nil, fmt.Errorf("resize %q: size of %s: %w", volumeID, st.Device, err)
	}
	switch {
	case have > size:
		return nil, fmt.Errorf("resize %q: %s has %d bytes, more than %d: devices do not shrink", volumeID, st.Device, have, size)
	case have < size:
		switch st.Method {
		case MethodNetlink:
			err = resizeNetlink(st, size)
		case MethodFallback:
			err = resizeLoop(st, size)
		default:
			err = ErrResizeUnsupported
		}
		if err != nil {
			return nil, fmt.Errorf("resize %q (%s on %s) to %d bytes: %w", volumeID, st.Method, st.Device, size, err)
		}
		if have, err = deviceSize(name); err != nil || have != size {
			return nil, fmt.Errorf("resize %q: %s has %d bytes after the resize to %d (%v)", volumeID, st.Device, have, size, err)
		}
		klog.InfoS("attachment resized", "volume", volumeID, "device", st.Device, "method", st.Method, "from", st.Size, "to", size)
	}
	if st.Size != size {
		st.Size = size
		if err := saveState(stateDir, st); err != nil {
			return nil, err
		}
	}
	a := st.Attachment
	return &a, nil
}

func resizeNetlink(st *state, size int64) error {
	idx, err := findByBackend(st.VolumeID)
	if err != nil {
		return err
	}
	if idx != st.Index {
		return fmt.Errorf("the volume is on nbd%d, its record says nbd%d", idx, st.Index)
	}
	nl, err := dialNBDNetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	return nl.resize(idx, uint64(size), st.VolumeID)
}

// resizeLoop raises the sizelimit of the fallback's loop device, still
// bound to nbdfuse's file, within the file's size (the ceiling).
func resizeLoop(st *state, size int64) error {
	if st.Ceiling < size {
		return fmt.Errorf("%w (nbdfuse's file has %d bytes)", ErrResizeUnsupported, st.Ceiling)
	}
	if !backedBy(st.Device, st.BackingFile) {
		return fmt.Errorf("%s is no longer bound to %s", st.Device, st.BackingFile)
	}
	f, err := os.OpenFile(st.Device, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fd := int(f.Fd())
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return fmt.Errorf("LOOP_GET_STATUS64: %w", err)
	}
	if info.Sizelimit == 0 || int64(info.Sizelimit) > size {
		// No limit would show the whole ceiling; a bigger one would be a
		// device someone else configured.
		return fmt.Errorf("%s has sizelimit %d: not ours to grow to %d", st.Device, info.Sizelimit, size)
	}
	info.Sizelimit = uint64(size)
	if err := unix.IoctlLoopSetStatus64(fd, info); err != nil {
		return fmt.Errorf("LOOP_SET_STATUS64 sizelimit %d: %w", size, err)
	}
	// Kernels that apply the new limit in SET_STATUS64 already did; on the
	// others this recomputes the capacity from it.
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("LOOP_SET_CAPACITY: %w", err)
	}
	return nil
}
