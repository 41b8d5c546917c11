package blockdev

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// FileOptions configures OpenFile.
type FileOptions struct {
	// Direct opens with O_DIRECT, bypassing the page cache (the cache
	// device should not double-cache in RAM). Requests whose buffer,
	// offset or length do not meet the device's O_DIRECT alignment go
	// through aligned bounce buffers. Filesystems without O_DIRECT (tmpfs)
	// make OpenFile fail with an error that says so.
	Direct bool
	// ReadOnly opens for reading only; writes and zeroes fail with EROFS.
	ReadOnly bool
}

// zeroChunk is the size of the buffer used when zeros must be written.
const zeroChunk = 1 << 20

// File is a Device backed by a regular file or a block device.
type File struct {
	path string
	f    *os.File
	// size only goes up, by Grow (a pool grew the file or volume under
	// an open device).
	size     atomic.Int64
	blockDev bool
	opts     FileOptions
	// align is the O_DIRECT offset and length alignment, memAlign the
	// buffer address alignment; both 1 without Direct.
	align, memAlign int64
	// noZeroRange is set once the filesystem refused ZERO_RANGE, and
	// noZeroOut once the block device refused BLKZEROOUT; Zero then
	// writes zeros.
	noZeroRange, noZeroOut atomic.Bool
	// rmw serialises read-modify-write of partially covered alignment
	// blocks (exclusive) against all other writes (shared), so that a
	// bounce never writes back stale neighbouring sectors.
	rmw sync.RWMutex
}

// OpenFile opens path (a regular file or a block device) as a Device. Its
// size is the file's size (BLKGETSIZE64 for a block device) rounded down
// to a multiple of SectorSize, or with Direct of the O_DIRECT alignment.
func OpenFile(path string, o FileOptions) (*File, error) {
	flags := os.O_RDWR
	if o.ReadOnly {
		flags = os.O_RDONLY
	}
	if o.Direct {
		flags |= syscall.O_DIRECT
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		if o.Direct && errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("blockdev: open %s: the filesystem does not support O_DIRECT (tmpfs does not); put the file on a disk-backed filesystem or open without Direct: %w", path, err)
		}
		return nil, fmt.Errorf("blockdev: open %s: %w", path, err)
	}
	d := &File{path: path, f: f, opts: o, align: 1, memAlign: 1}
	if err := d.probe(); err != nil {
		f.Close()
		return nil, err
	}
	klog.V(2).InfoS("Opened block device file", "path", path, "size", d.Size(), "blockDevice", d.blockDev,
		"direct", o.Direct, "readOnly", o.ReadOnly, "directAlign", d.align, "directMemAlign", d.memAlign)
	return d, nil
}

// probe finds the kind, size and O_DIRECT alignment of the open file.
func (d *File) probe() error {
	var st unix.Statx_t
	err := d.control(func(fd int) error {
		return unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS|unix.STATX_DIOALIGN, &st)
	})
	if err != nil {
		return fmt.Errorf("blockdev: statx %s: %w", d.path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFBLK:
		d.blockDev = true
	default:
		return fmt.Errorf("blockdev: %s is neither a regular file nor a block device (mode %#o): %w", d.path, st.Mode, syscall.EINVAL)
	}
	if d.opts.Direct {
		// Without the kernel's answer (STATX_DIOALIGN, Linux 6.1+), 4096
		// satisfies every device we meet.
		d.align, d.memAlign = 4096, 4096
		if st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_offset_align != 0 {
			d.align, d.memAlign = int64(st.Dio_offset_align), int64(st.Dio_mem_align)
			if d.memAlign == 0 {
				d.memAlign = 4096
			}
		} else if st.Mask&unix.STATX_DIOALIGN != 0 && !d.blockDev {
			// The filesystem says it cannot do direct I/O to this file
			// even though open accepted O_DIRECT.
			return fmt.Errorf("blockdev: open %s: the filesystem does not support O_DIRECT on this file; open without Direct: %w", d.path, syscall.EINVAL)
		}
	}
	size, err := d.measure()
	if err != nil {
		return err
	}
	d.size.Store(size)
	return nil
}

// measure reads the size of the file (BLKGETSIZE64 of a block device),
// rounded down to a multiple of SectorSize and, with Direct, of the
// O_DIRECT alignment: a partial block at the end cannot be written with
// O_DIRECT (the aligned write would grow the file or fail), so it is left
// out.
func (d *File) measure() (int64, error) {
	var size int64
	if d.blockDev {
		var n uint64
		err := d.control(func(fd int) error {
			_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n)))
			if errno != 0 {
				return errno
			}
			return nil
		})
		if err != nil {
			return 0, fmt.Errorf("blockdev: BLKGETSIZE64 %s: %w", d.path, err)
		}
		size = int64(n)
	} else {
		fi, err := d.f.Stat()
		if err != nil {
			return 0, fmt.Errorf("blockdev: stat %s: %w", d.path, err)
		}
		size = fi.Size()
	}
	size = size / SectorSize * SectorSize
	if tail := size % d.align; tail != 0 {
		klog.InfoS("Direct I/O cannot use the partial block at the end; ignoring it", "path", d.path, "bytes", tail)
		size -= tail
	}
	return size, nil
}

// Grow implements Grower: the file or block device was made bigger under
// the open device (pool.Expand), and the device takes at least size bytes
// of it. It refuses a size the storage does not have.
func (d *File) Grow(size int64) error {
	have, err := d.measure()
	if err != nil {
		return err
	}
	if size > have {
		return fmt.Errorf("blockdev: grow %s to %d bytes: it has only %d: %w", d.path, size, have, syscall.EINVAL)
	}
	for {
		cur := d.size.Load()
		if have <= cur || d.size.CompareAndSwap(cur, have) {
			return nil
		}
	}
}

// control runs fn with the file descriptor, holding it against Close.
func (d *File) control(fn func(fd int) error) error {
	rc, err := d.f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// Path is the path the device was opened from.
func (d *File) Path() string { return d.path }

// Size implements Device.
func (d *File) Size() int64 { return d.size.Load() }

// IsBlockDevice reports whether the file is a block device.
func (d *File) IsBlockDevice() bool { return d.blockDev }

func (d *File) check(op string, off, length int64) error {
	if size := d.size.Load(); off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("blockdev: %s %s [%d, +%d) outside device of %d bytes: %w", op, d.path, off, length, size, syscall.EINVAL)
	}
	return nil
}

func (d *File) aligned(p []byte, off int64) bool {
	if d.align == 1 {
		return true
	}
	if off%d.align != 0 || int64(len(p))%d.align != 0 {
		return false
	}
	return len(p) == 0 || int64(uintptr(unsafe.Pointer(&p[0])))%d.memAlign == 0
}

// alignedBuf returns a zeroed buffer of n bytes whose address meets
// memAlign (Go does not move heap objects, so the alignment holds).
func (d *File) alignedBuf(n int64) []byte {
	a := max(d.memAlign, 1)
	b := make([]byte, n+a)
	skip := (a - int64(uintptr(unsafe.Pointer(&b[0])))%a) % a
	return b[skip : skip+n : skip+n]
}

// pread reads exactly len(p) bytes at off, or reports a short read.
func (d *File) pread(p []byte, off int64) (int, error) {
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return n, fmt.Errorf("blockdev: read %s at %d (+%d): %w", d.path, off, len(p), err)
	}
	return n, nil
}

// ReadAt implements Device. A short read is an error wrapping
// io.ErrUnexpectedEOF.
func (d *File) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.aligned(p, off) {
		return d.pread(p, off)
	}
	start := off / d.align * d.align
	end := (off + int64(len(p)) + d.align - 1) / d.align * d.align
	buf := d.alignedBuf(end - start)
	n, err := d.f.ReadAt(buf, start)
	// The aligned range may run past a size that is not a multiple of
	// the alignment; only the requested part must be there.
	if int64(n) < off-start+int64(len(p)) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, fmt.Errorf("blockdev: read %s at %d (+%d): %w", d.path, off, len(p), err)
	}
	return copy(p, buf[off-start:]), nil
}

// WriteAt implements Device.
func (d *File) WriteAt(p []byte, off int64) (int, error) {
	if d.opts.ReadOnly {
		return 0, fmt.Errorf("blockdev: write %s: opened read-only: %w", d.path, syscall.EROFS)
	}
	if err := d.check("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.aligned(p, off) {
		d.rmw.RLock()
		defer d.rmw.RUnlock()
		return d.pwrite(p, off)
	}
	if off%d.align == 0 && int64(len(p))%d.align == 0 {
		// Only the buffer address is wrong: copy, no read needed.
		buf := d.alignedBuf(int64(len(p)))
		copy(buf, p)
		d.rmw.RLock()
		defer d.rmw.RUnlock()
		if _, err := d.pwrite(buf, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	// Read-modify-write of the partially covered blocks at the ends.
	d.rmw.Lock()
	defer d.rmw.Unlock()
	start := off / d.align * d.align
	end := (off + int64(len(p)) + d.align - 1) / d.align * d.align
	buf := d.alignedBuf(end - start)
	if _, err := d.f.ReadAt(buf[:d.align], start); err != nil && err != io.EOF {
		return 0, fmt.Errorf("blockdev: write %s at %d: read for alignment: %w", d.path, off, err)
	}
	if last := end - d.align; last > start {
		if _, err := d.f.ReadAt(buf[last-start:], last); err != nil && err != io.EOF {
			return 0, fmt.Errorf("blockdev: write %s at %d: read for alignment: %w", d.path, off, err)
		}
	}
	copy(buf[off-start:], p)
	if _, err := d.pwrite(buf, start); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (d *File) pwrite(p []byte, off int64) (int, error) {
	n, err := d.f.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("blockdev: write %s at %d (+%d): %w", d.path, off, len(p), err)
	}
	return n, nil
}

// Flush implements Device with fdatasync.
func (d *File) Flush() error {
	if err := d.control(unix.Fdatasync); err != nil {
		return fmt.Errorf("blockdev: fdatasync %s: %w", d.path, err)
	}
	return nil
}

// Zero implements Device without freeing space, so a volume whose pool
// promised it (a fallocated file, a thick LV) keeps every block: a regular
// file gets fallocate(ZERO_RANGE|KEEP_SIZE) (unwritten extents, done in
// metadata), a block device BLKZEROOUT (which the kernel issues with
// NOUNMAP: WRITE ZEROES where the device has it, else zeros written by the
// kernel). Where neither is supported, zeros are written.
func (d *File) Zero(off, length int64) error {
	if d.opts.ReadOnly {
		return fmt.Errorf("blockdev: zero %s: opened read-only: %w", d.path, syscall.EROFS)
	}
	if err := d.check("zero", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	done, err := d.zeroInPlace(off, length)
	if done || err != nil {
		return err
	}
	// Write zeros, in chunks.
	aligned := off%d.align == 0 && length%d.align == 0
	buf := d.alignedBuf(min(length, zeroChunk))
	for length > 0 {
		n := min(length, int64(len(buf)))
		if aligned {
			d.rmw.RLock()
			_, err = d.pwrite(buf[:n], off)
			d.rmw.RUnlock()
		} else {
			// A sector-aligned range on a device whose O_DIRECT
			// alignment is bigger: WriteAt's read-modify-write.
			_, err = d.WriteAt(buf[:n], off)
		}
		if err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// zeroInPlace zeroes with fallocate(ZERO_RANGE) (regular file) or
// BLKZEROOUT (block device). It reports done=false, err=nil when the
// device cannot, so the caller writes zeros.
func (d *File) zeroInPlace(off, length int64) (done bool, err error) {
	d.rmw.RLock()
	defer d.rmw.RUnlock()
	if !d.blockDev && !d.noZeroRange.Load() {
		err := d.control(func(fd int) error {
			return unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		})
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, syscall.EOPNOTSUPP) && !errors.Is(err, syscall.ENOSYS) {
			return false, fmt.Errorf("blockdev: fallocate(ZERO_RANGE) %s [%d, +%d): %w", d.path, off, length, err)
		}
		d.noZeroRange.Store(true)
		klog.InfoS("Filesystem cannot zero a range in place; zeroing by writing zeros", "path", d.path, "err", err)
	}
	if d.blockDev && !d.noZeroOut.Load() && off%SectorSize == 0 && length%SectorSize == 0 {
		if err := d.rangeIoctl(unix.BLKZEROOUT, off, length); err == nil {
			return true, nil
		} else if errors.Is(err, syscall.EIO) {
			return false, fmt.Errorf("blockdev: BLKZEROOUT %s [%d, +%d): %w", d.path, off, length, err)
		} else {
			d.noZeroOut.Store(true)
			klog.InfoS("Block device refused BLKZEROOUT; zeroing by writing zeros", "path", d.path, "err", err)
		}
	}
	return false, nil
}

func (d *File) rangeIoctl(req uint, off, length int64) error {
	rng := [2]uint64{uint64(off), uint64(length)}
	return d.control(func(fd int) error {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&rng)))
		if errno != 0 {
			return errno
		}
		return nil
	})
}

// Discard implements Discarder: it frees the range, a hole punched in a
// regular file, BLKDISCARD on a block device. Only for thin-provisioned
// backing devices whose pool asks for it (see Discarder).
func (d *File) Discard(off, length int64) error {
	if d.opts.ReadOnly {
		return fmt.Errorf("blockdev: discard %s: opened read-only: %w", d.path, syscall.EROFS)
	}
	if err := d.check("discard", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	d.rmw.RLock()
	defer d.rmw.RUnlock()
	if d.blockDev {
		if err := d.rangeIoctl(unix.BLKDISCARD, off, length); err != nil {
			return fmt.Errorf("blockdev: BLKDISCARD %s [%d, +%d): %w", d.path, off, length, err)
		}
		return nil
	}
	if err := d.control(func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}); err != nil {
		return fmt.Errorf("blockdev: punch hole %s [%d, +%d): %w", d.path, off, length, err)
	}
	return nil
}

// ZeroDeallocates implements ZeroDeallocator: Zero is done in metadata
// (ZERO_RANGE on a regular file, or BLKZEROOUT on a block device, which the
// model treats as cheap, as thin and SSD devices do it in metadata).
func (d *File) ZeroDeallocates() bool {
	if d.blockDev {
		return !d.noZeroOut.Load()
	}
	return !d.noZeroRange.Load()
}

// Close implements Device; it does not flush.
func (d *File) Close() error {
	if err := d.f.Close(); err != nil {
		return fmt.Errorf("blockdev: close %s: %w", d.path, err)
	}
	return nil
}

// CreateSparseFile creates path as a sparse file of size bytes, or grows
// an existing smaller file to size. It refuses to shrink a bigger file
// (that would destroy data). The new size is made durable.
func CreateSparseFile(path string, size int64) error {
	if size <= 0 || size%SectorSize != 0 {
		return fmt.Errorf("blockdev: create %s: size %d is not a positive multiple of %d: %w", path, size, SectorSize, syscall.EINVAL)
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("blockdev: create %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("blockdev: create %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("blockdev: create %s: exists and is not a regular file: %w", path, syscall.EINVAL)
	}
	switch {
	case fi.Size() > size:
		return fmt.Errorf("blockdev: create %s: existing file is %d bytes, bigger than the requested %d; refusing to shrink it: %w", path, fi.Size(), size, syscall.EINVAL)
	case fi.Size() < size:
		if err := f.Truncate(size); err != nil {
			return fmt.Errorf("blockdev: grow %s to %d bytes: %w", path, size, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("blockdev: fsync %s: %w", path, err)
	}
	if created {
		if err := syncDir(filepath.Dir(path)); err != nil {
			return err
		}
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("blockdev: open dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("blockdev: fsync dir %s: %w", dir, err)
	}
	return nil
}
