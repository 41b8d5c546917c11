// Package pool allocates the node's storage for writeboost volumes: a
// backing volume on the HDD pool and a cache slice on the NVMe pool.
//
// The directory kind keeps each volume as a file NAME.img in a directory on
// a mounted filesystem. Files are allocated with fallocate, so a volume owns
// real blocks from the start: the capacity the driver reports is what the
// filesystem really has left (statfs), nothing is overcommitted, and the
// accounting needs no bookkeeping of its own that could drift or be lost in
// a restart. A full filesystem fails creation with ErrNoSpace.
//
// The LVM kind keeps each volume as a fully allocated logical volume in a
// volume group, through the lvm tools (lvm.go); capacity is the group's
// free space as vgs reports it.
//
// Neither kind ever hands out a previous tenant's data. A new file is
// all holes or unwritten extents, which read as zeros, and a deleted file
// gives its blocks back to the filesystem, which zeroes them for the next
// owner; a file is only reused by a retry of the same Create. LVM extents
// keep their bytes when an LV is removed, so the LVM pool wipes deleted
// volumes in the background before their space is free again (lvm.go).
package pool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Errors callers test for.
var (
	ErrNoSpace   = errors.New("pool: not enough free space")
	ErrNotFound  = errors.New("pool: no such volume")
	ErrSizeClash = errors.New("pool: volume exists with another size")
)

// Kinds of pools.
const (
	KindDirectory = "directory"
	KindLVM       = "lvm"
)

// Config describes one pool.
type Config struct {
	Kind        string `json:"kind"`
	Path        string `json:"path,omitempty"`
	VolumeGroup string `json:"volumeGroup,omitempty"`
	// ZeroFreeSpace (LVM; default true) wipes the volume group's free
	// space in the background when the pool first adopts the group, so
	// no volume ever gets extents holding older data. Set it to false only
	// when the free space is known to read as zeros (a new group on
	// blkdiscard'ed SSDs whose discards zero).
	ZeroFreeSpace *bool `json:"zeroFreeSpace,omitempty"`
	// Discard (directory pools; default false) declares the pool thin:
	// a TRIM of a volume is passed down and punches holes in its file,
	// giving the space back to the filesystem, which then no longer
	// holds it for the volume (a later write may find the filesystem
	// full). Off, a volume keeps every block it was created with and TRIM
	// costs the backing device nothing. LVM pools are thick and refuse it.
	Discard bool `json:"discard,omitempty"`
}

// PassesDiscards reports whether p is a thin pool that asks for TRIM to be
// passed down to its volumes (Config.Discard).
func PassesDiscards(p Pool) bool {
	d, ok := p.(*Directory)
	return ok && d.Discard
}

// Pool hands out volumes by name.
type Pool interface {
	// Create allocates name with size bytes, or returns the existing
	// volume's path when it already has exactly that size.
	Create(name string, size int64) (string, error)
	// Expand grows name to size bytes (never shrinks).
	Expand(name string, size int64) error
	// Delete removes name; a missing volume is not an error.
	Delete(name string) error
	// Lookup returns the path and size of name, or ErrNotFound.
	Lookup(name string) (path string, size int64, err error)
	// Capacity returns the bytes still free for new volumes.
	Capacity() (int64, error)
	// Check reports whether the pool is usable.
	Check() error
	String() string
}

// New opens the pool described by c.
func New(c Config) (Pool, error) {
	switch c.Kind {
	case KindDirectory, "":
		if c.ZeroFreeSpace != nil {
			return nil, errors.New("pool: zeroFreeSpace is an option of lvm pools (a directory pool never reuses data)")
		}
		if c.Path == "" {
			return nil, errors.New("pool: directory pool needs a path")
		}
		if err := os.MkdirAll(c.Path, 0o700); err != nil {
			return nil, fmt.Errorf("pool: create %s: %w", c.Path, err)
		}
		return &Directory{Dir: c.Path, Discard: c.Discard}, nil
	case KindLVM:
		if c.VolumeGroup == "" {
			return nil, errors.New("pool: lvm pool needs a volumeGroup")
		}
		if c.Discard {
			return nil, errors.New("pool: discard is an option of directory pools (lvm pools are thick: a discard would free nothing)")
		}
		return &LVM{VG: c.VolumeGroup, ZeroFreeSpace: c.ZeroFreeSpace == nil || *c.ZeroFreeSpace}, nil
	default:
		return nil, fmt.Errorf("pool: unknown kind %q (allowed: %s, %s)", c.Kind, KindDirectory, KindLVM)
	}
}

// Directory is a pool of fallocated files in one directory.
type Directory struct {
	Dir string
	// Discard: the pool is thin; TRIM punches holes (Config.Discard).
	Discard bool
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$`)

func (d *Directory) String() string { return "directory:" + d.Dir }

func (d *Directory) path(name string) (string, error) {
	if !nameRE.MatchString(name) || strings.Contains(name, "..") {
		return "", fmt.Errorf("pool: bad volume name %q", name)
	}
	return filepath.Join(d.Dir, name+".img"), nil
}

// Create implements Pool.
func (d *Directory) Create(name string, size int64) (string, error) {
	p, err := d.path(name)
	if err != nil {
		return "", err
	}
	if size <= 0 || size%4096 != 0 {
		return "", fmt.Errorf("pool: size %d is not a positive multiple of 4096", size)
	}
	if fi, err := os.Stat(p); err == nil {
		if fi.Size() != size {
			return "", fmt.Errorf("%w: %s is %d bytes, asked %d", ErrSizeClash, name, fi.Size(), size)
		}
		return p, nil
	}
	// Write to a temporary name and rename, so a crash mid-allocation
	// never leaves a short file that a retry would take as the volume.
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", fmt.Errorf("pool: create %s: %w", tmp, err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		f.Close()
		os.Remove(tmp)
		if errors.Is(err, syscall.ENOSPC) {
			return "", fmt.Errorf("%w: %s needs %d bytes in %s", ErrNoSpace, name, size, d.Dir)
		}
		return "", fmt.Errorf("pool: fallocate %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return "", fmt.Errorf("pool: fsync %s: %w", tmp, err)
	}
	f.Close()
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("pool: rename %s: %w", tmp, err)
	}
	return p, syncDir(d.Dir)
}

// Expand implements Pool.
func (d *Directory) Expand(name string, size int64) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if err != nil {
		return fmt.Errorf("pool: open %s: %w", p, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() >= size {
		return nil
	}
	if err := unix.Fallocate(int(f.Fd()), 0, fi.Size(), size-fi.Size()); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return fmt.Errorf("%w: growing %s to %d bytes", ErrNoSpace, name, size)
		}
		return fmt.Errorf("pool: fallocate %s: %w", p, err)
	}
	return f.Sync()
}

// Delete implements Pool.
func (d *Directory) Delete(name string) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	os.Remove(p + ".tmp")
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pool: delete %s: %w", p, err)
	}
	return syncDir(d.Dir)
}

// Lookup implements Pool.
func (d *Directory) Lookup(name string) (string, int64, error) {
	p, err := d.path(name)
	if err != nil {
		return "", 0, err
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return "", 0, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if err != nil {
		return "", 0, err
	}
	return p, fi.Size(), nil
}

// Capacity implements Pool: the free bytes of the filesystem, which the
// fallocated volumes have already taken their share from.
func (d *Directory) Capacity() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(d.Dir, &st); err != nil {
		return 0, fmt.Errorf("pool: statfs %s: %w", d.Dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// Check implements Pool.
func (d *Directory) Check() error {
	fi, err := os.Stat(d.Dir)
	if err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("pool: %s is not a directory", d.Dir)
	}
	return unix.Access(d.Dir, unix.W_OK)
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("pool: fsync %s: %w", dir, err)
	}
	return nil
}
