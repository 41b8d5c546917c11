package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// parseSize parses a byte count with an optional binary suffix: 4GiB, 4G,
// 512Mi, 512m, 1T, 65536. Every suffix is a power of 1024: block devices
// are sized in binary units and "4G" meaning 4e9 would surprise.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "b")
	t = strings.TrimSuffix(t, "i")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		case 'p', 'P':
			mult = 1 << 50
		}
		if mult != 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
	if err != nil || v < 0 || v*float64(mult) > float64(1<<62) {
		return 0, fmt.Errorf("%q is not a size (examples: 4GiB, 512M, 1048576)", s)
	}
	n := int64(v * float64(mult))
	return n, nil
}

// sizeValue is a pflag.Value for sizes.
type sizeValue struct{ n *int64 }

func (v sizeValue) String() string {
	if v.n == nil {
		return "0"
	}
	for _, u := range []struct {
		s string
		m int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if *v.n >= u.m && *v.n%u.m == 0 {
			return strconv.FormatInt(*v.n/u.m, 10) + u.s
		}
	}
	return strconv.FormatInt(*v.n, 10)
}

func (v sizeValue) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*v.n = n
	return nil
}

func (v sizeValue) Type() string { return "size" }

// ensureImage creates path as a sparse file of size bytes when it does not
// exist, and reports whether it did. An existing file or device is left as
// it is: the engine decides whether its contents fit.
func ensureImage(path string, size int64) (created bool, err error) {
	if _, err := os.Stat(path); err == nil {
		return false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("image %s: %w", path, err)
	}
	if abs, _ := filepath.Abs(path); strings.HasPrefix(abs, "/dev/") {
		// A mistyped device name must not become a file on devtmpfs.
		return false, fmt.Errorf("device %s does not exist", path)
	}
	if size <= 0 || size%4096 != 0 {
		return false, fmt.Errorf("image %s: size %d is not a positive multiple of 4096", path, size)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return false, fmt.Errorf("image %s: %w", path, err)
	}
	if err := blockdev.CreateSparseFile(path, size); err != nil {
		return false, err
	}
	klog.InfoS("Created sparse image", "path", path, "size", size)
	return true, nil
}

// defaultBufferPath picks where the RAM buffers of the cache at cachePath
// live: on tmpfs (/dev/shm) when the machine has it, so they outlive a
// killed process (no acknowledged write is lost to SIGKILL) but not a
// reboot; else next to the cache. The name is derived from the cache's
// absolute path, so a restart finds the buffers its predecessor left.
func defaultBufferPath(cachePath, dataDir string) (string, error) {
	abs, err := filepath.Abs(cachePath)
	if err != nil {
		return "", fmt.Errorf("buffer file for %s: %w", cachePath, err)
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		abs = r
	}
	sum := sha256.Sum256([]byte(abs))
	name := "writeboost-" + hex.EncodeToString(sum[:8]) + ".buf"
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() && unix.Access("/dev/shm", unix.W_OK) == nil {
		return filepath.Join("/dev/shm", name), nil
	}
	return filepath.Join(dataDir, name), nil
}
