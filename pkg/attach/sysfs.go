package attach

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"k8s.io/klog/v2"
)

// sysBlock is where the block devices' attributes live; a variable so tests
// can point it at a fake tree.
var sysBlock = "/sys/block"

// ErrNoKernelNBD means this kernel has no nbd driver, built in or loadable.
var ErrNoKernelNBD = errors.New("kernel nbd driver not available")

// ErrNotFound means no device carries the requested backend identifier.
var ErrNotFound = errors.New("no nbd device with this backend identifier")

var modprobeOnce sync.Once

// ensureKernelNBD loads the nbd module when the kernel does not have the
// driver yet. With the netlink interface devices can be created on demand
// (nbds_max=0), so /dev/nbd0 missing is only a hint; /sys/module/nbd is
// the truth.
func ensureKernelNBD() error {
	if kernelNBDLoaded() {
		return nil
	}
	modprobeOnce.Do(func() {
		out, err := exec.Command("modprobe", "nbd").CombinedOutput()
		if err != nil {
			klog.V(2).InfoS("modprobe nbd failed", "err", err, "output", strings.TrimSpace(string(out)))
		}
	})
	if kernelNBDLoaded() {
		return nil
	}
	return ErrNoKernelNBD
}

func kernelNBDLoaded() bool {
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		return true
	}
	_, err := os.Stat("/dev/nbd0")
	return err == nil
}

// findByBackend returns the index of the nbd device whose backend identifier
// (set by CONNECT, shown in /sys/block/nbdX/backend) is id.
func findByBackend(id string) (int, error) {
	paths, err := filepath.Glob(filepath.Join(sysBlock, "nbd*", "backend"))
	if err != nil {
		return -1, err
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // device going away, or not connected
		}
		if strings.TrimRight(string(b), "\n") != id {
			continue
		}
		name := filepath.Base(filepath.Dir(p))
		idx, err := strconv.Atoi(strings.TrimPrefix(name, "nbd"))
		if err != nil {
			continue
		}
		return idx, nil
	}
	return -1, fmt.Errorf("%w: %q", ErrNotFound, id)
}

// raiseMaxSectors lifts the device's request size limit to what the hardware
// (here: the nbd driver, 32 MiB) allows. The default is small and splits
// large sequential I/O into many requests, each a round trip to the server.
func raiseMaxSectors(devName string) error {
	q := filepath.Join(sysBlock, devName, "queue")
	hw, err := os.ReadFile(filepath.Join(q, "max_hw_sectors_kb"))
	if err != nil {
		return fmt.Errorf("read max_hw_sectors_kb: %w", err)
	}
	v := strings.TrimSpace(string(hw))
	if _, err := strconv.Atoi(v); err != nil {
		return fmt.Errorf("max_hw_sectors_kb %q: %w", v, err)
	}
	if err := os.WriteFile(filepath.Join(q, "max_sectors_kb"), []byte(v), 0); err != nil {
		return fmt.Errorf("write max_sectors_kb=%s: %w", v, err)
	}
	return nil
}

// deviceSize returns the size in bytes of a block device from sysfs (0 when
// it is not connected).
func deviceSize(devName string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(sysBlock, devName, "size"))
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, err
	}
	return n * 512, nil
}
