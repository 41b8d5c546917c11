package driver

import (
	"errors"
	"fmt"
	"os"

	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// Mounter is the seam to the node's mount table and filesystem tools.
type Mounter interface {
	FormatAndMount(source, target, fstype string, options []string) error
	Mount(source, target, fstype string, options []string) error
	Unmount(target string) error
	// IsMountPoint reports whether path is mounted on; a missing path is
	// not a mount point.
	IsMountPoint(path string) (bool, error)
	// Resize grows the filesystem on device mounted at mountPath.
	Resize(device, mountPath string) error
	// ResizeUnmounted grows an unmounted ext2/3/4 filesystem to its device
	// (no-op for other formats): online ext4 resizing needs
	// CAP_SYS_RESOURCE, which containers often lack.
	ResizeUnmounted(device string) error
}

type systemMounter struct {
	sfm *mount.SafeFormatAndMount
}

func newSystemMounter() *systemMounter {
	return &systemMounter{sfm: mount.NewSafeFormatAndMount(mount.New(""), utilexec.New())}
}

func (m *systemMounter) FormatAndMount(source, target, fstype string, options []string) error {
	return m.sfm.FormatAndMount(source, target, fstype, options)
}

func (m *systemMounter) Mount(source, target, fstype string, options []string) error {
	return m.sfm.Mount(source, target, fstype, options)
}

func (m *systemMounter) Unmount(target string) error { return m.sfm.Unmount(target) }

func (m *systemMounter) IsMountPoint(path string) (bool, error) {
	mp, err := m.sfm.IsMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return mp, err
}

func (m *systemMounter) ResizeUnmounted(device string) error {
	format, err := m.sfm.GetDiskFormat(device)
	if err != nil {
		return fmt.Errorf("detect filesystem on %s: %w", device, err)
	}
	switch format {
	case "ext2", "ext3", "ext4":
	default:
		return nil
	}
	// resize2fs wants a freshly checked filesystem. e2fsck -p exits 1 when
	// it fixed something, which is fine here.
	if out, err := m.sfm.Exec.Command("e2fsck", "-f", "-p", device).CombinedOutput(); err != nil {
		var ee utilexec.ExitError
		if !errors.As(err, &ee) || ee.ExitStatus() > 1 {
			return fmt.Errorf("e2fsck %s: %v: %s", device, err, out)
		}
	}
	if out, err := m.sfm.Exec.Command("resize2fs", device).CombinedOutput(); err != nil {
		return fmt.Errorf("resize2fs %s: %v: %s", device, err, out)
	}
	return nil
}

func (m *systemMounter) Resize(device, mountPath string) error {
	_, err := mount.NewResizeFs(m.sfm.Exec).Resize(device, mountPath)
	return err
}
