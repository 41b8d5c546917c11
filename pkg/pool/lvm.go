package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Runner runs an lvm tool and returns its stdout (a seam for tests).
type Runner func(ctx context.Context, name string, args ...string) (stdout []byte, err error)

func execRunner(ctx context.Context, name string, args ...string) ([]byte, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// LVM is a pool of logical volumes in one volume group, managed with the
// lvm tools (lvcreate, lvextend, lvremove, lvs, vgs). Volumes are fully
// allocated (no thin provisioning), so capacity is the group's free space.
//
// Not run on the development machines (no device-mapper there): only the
// commands and the parsing are unit-tested.
type LVM struct {
	VG  string
	Run Runner
	// ZeroHead overwrites the first bytes of a new volume (nil: the real
	// device). Extents may hold an older volume's data; a cache slice must
	// look blank to the engine, whose superblocks live in the first MiB.
	ZeroHead func(path string, n int64) error
}

// headBytes is zeroed at the start of every new logical volume.
const headBytes = 1 << 20

func zeroHead(path string, n int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, n), 0); err != nil {
		return err
	}
	return f.Sync()
}

func (l *LVM) String() string { return "lvm:" + l.VG }

func (l *LVM) run(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r := l.Run
	if r == nil {
		r = execRunner
	}
	return r(ctx, args[0], args[1:]...)
}

func (l *LVM) lv(name string) (string, error) {
	if !nameRE.MatchString(name) || strings.Contains(name, "..") {
		return "", fmt.Errorf("pool: bad volume name %q", name)
	}
	return l.VG + "/" + name, nil
}

// bytesField parses lvm's "--units b --nosuffix" output.
func bytesField(out []byte) (int64, error) {
	s := strings.TrimSpace(string(out))
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("pool: lvm printed %q, not a byte count", s)
	}
	return n, nil
}

// Create implements Pool.
func (l *LVM) Create(name string, size int64) (string, error) {
	lv, err := l.lv(name)
	if err != nil {
		return "", err
	}
	if size <= 0 || size%4096 != 0 {
		return "", fmt.Errorf("pool: size %d is not a positive multiple of 4096", size)
	}
	if p, have, err := l.Lookup(name); err == nil {
		// lvm rounds up to its extent size: accept what the first call got.
		if have < size || have >= size+extentSlack {
			return "", fmt.Errorf("%w: %s is %d bytes, asked %d", ErrSizeClash, name, have, size)
		}
		return p, nil
	} else if !errors.Is(err, ErrNotFound) {
		return "", err
	}
	if free, err := l.Capacity(); err == nil && free < size {
		return "", fmt.Errorf("%w: %s needs %d bytes, volume group %s has %d", ErrNoSpace, name, size, l.VG, free)
	}
	if _, err := l.run("lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y", "--name", name,
		"--size", strconv.FormatInt(size, 10)+"b", l.VG); err != nil {
		if strings.Contains(err.Error(), "insufficient free space") {
			return "", fmt.Errorf("%w: %v", ErrNoSpace, err)
		}
		return "", fmt.Errorf("pool: create %s: %w", lv, err)
	}
	path := "/dev/" + lv
	z := l.ZeroHead
	if z == nil {
		z = zeroHead
	}
	if err := z(path, min(size, headBytes)); err != nil {
		return "", fmt.Errorf("pool: zero the start of %s: %w", path, err)
	}
	return path, nil
}

// extentSlack is how much bigger than asked an LV may be (lvm rounds up to
// the extent size, 4 MiB by default; allow up to 64 MiB extents).
const extentSlack = 64 << 20

// Expand implements Pool.
func (l *LVM) Expand(name string, size int64) error {
	lv, err := l.lv(name)
	if err != nil {
		return err
	}
	_, have, err := l.Lookup(name)
	if err != nil {
		return err
	}
	if have >= size {
		return nil
	}
	if _, err := l.run("lvextend", "--size", strconv.FormatInt(size, 10)+"b", lv); err != nil {
		if strings.Contains(err.Error(), "insufficient free space") {
			return fmt.Errorf("%w: %v", ErrNoSpace, err)
		}
		return fmt.Errorf("pool: extend %s: %w", lv, err)
	}
	return nil
}

// Delete implements Pool.
func (l *LVM) Delete(name string) error {
	lv, err := l.lv(name)
	if err != nil {
		return err
	}
	if _, _, err := l.Lookup(name); errors.Is(err, ErrNotFound) {
		return nil
	}
	if _, err := l.run("lvremove", "--yes", lv); err != nil {
		return fmt.Errorf("pool: remove %s: %w", lv, err)
	}
	return nil
}

// Lookup implements Pool.
func (l *LVM) Lookup(name string) (string, int64, error) {
	lv, err := l.lv(name)
	if err != nil {
		return "", 0, err
	}
	out, err := l.run("lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", lv)
	if err != nil {
		if strings.Contains(err.Error(), "Failed to find logical volume") || strings.Contains(err.Error(), "not found") {
			return "", 0, fmt.Errorf("%w: %s", ErrNotFound, lv)
		}
		return "", 0, fmt.Errorf("pool: %w", err)
	}
	n, err := bytesField(out)
	if err != nil {
		return "", 0, err
	}
	return "/dev/" + lv, n, nil
}

// Capacity implements Pool.
func (l *LVM) Capacity() (int64, error) {
	out, err := l.run("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", l.VG)
	if err != nil {
		return 0, fmt.Errorf("pool: %w", err)
	}
	return bytesField(out)
}

// Check implements Pool.
func (l *LVM) Check() error {
	_, err := l.Capacity()
	return err
}
