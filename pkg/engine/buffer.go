package engine

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BufferMemory holds the engine's RAM buffers: segments being filled and
// segments waiting for the flusher, in their exact on-disk form, each after
// a small control block.
//
// Where the memory lives decides which failures lose acknowledged but not
// yet flushed writes:
//
//   - heap memory (nil Options.Buffer and no BufferPath): lost when the
//     process dies.
//   - a MAP_SHARED mapping of a file (OpenBufferFile), ideally on tmpfs
//     (/run, /dev/shm): the kernel keeps it when the process is killed, and
//     the next Open of the same cache replays it. A power loss or reboot
//     loses it (a boot id in each control block makes Open ignore a file
//     that survived a reboot on a persistent filesystem, since its pages may
//     have reached the disk torn).
type BufferMemory interface {
	Bytes() []byte
	Close() error
}

const ctrlSize = 4096

// BufferBytes is the size of BufferMemory that Open needs.
func BufferBytes(segmentSize, nrBuffers int) int { return nrBuffers * (ctrlSize + segmentSize) }

type heapMemory struct{ b []byte }

func (h *heapMemory) Bytes() []byte { return h.b }
func (h *heapMemory) Close() error  { return nil }

// NewHeapBuffer returns process memory for RAM buffers. Tests keep it across
// an abandoned engine to model a process kill that memory survives.
func NewHeapBuffer(size int) BufferMemory {
	// Align to 4 KiB for O_DIRECT writes straight from the buffer.
	raw := make([]byte, size+4096)
	off := int(-uintptr(unsafe.Pointer(&raw[0]))) & 4095
	return &heapMemory{b: raw[off : off+size : off+size]}
}

type fileMemory struct {
	b []byte
	f *os.File
}

func (m *fileMemory) Bytes() []byte { return m.b }
func (m *fileMemory) Close() error {
	err := unix.Munmap(m.b)
	if cerr := m.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// OpenBufferFile maps path (created or resized to size) shared, so that
// what the engine stores there outlives the process.
func OpenBufferFile(path string, size int) (BufferMemory, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open buffer file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat buffer file %s: %w", path, err)
	}
	if st.Size() != int64(size) {
		// A file of another size belongs to another geometry: start afresh.
		err := f.Truncate(0)
		if err == nil {
			err = f.Truncate(int64(size))
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("size buffer file %s: %w", path, err)
		}
	}
	// Truncate only sets the size: on a full tmpfs the first store to a
	// page that cannot be allocated is a SIGBUS, which kills every volume
	// of the process. Allocating every page now turns that into an error
	// here. Data already in the file is kept (mode 0).
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(size)); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		f.Close()
		return nil, fmt.Errorf("allocate %d bytes for buffer file %s: %w", size, path, err)
	}
	b, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("mmap buffer file %s: %w", path, err)
	}
	return &fileMemory{b: b, f: f}, nil
}

// Control block of a RAM buffer (all little-endian):
//
//	| off | size | field                                          |
//	|-----|------|------------------------------------------------|
//	| 0   | 8    | magic "WBBUFCTL"                               |
//	| 8   | 16   | cache UUID                                     |
//	| 24  | 16   | boot id of the kernel that wrote it            |
//	| 40  | 8    | segment id held (0 = none)                     |
//	| 48  | 4    | entries used (stored last, atomically)         |
//
// A writer fills a data block, then its metablock, then stores the count,
// so a process killed at any instant leaves count entries that are all
// complete; an acknowledgement is sent only after the count covers it.
var ctrlMagic = [8]byte{'W', 'B', 'B', 'U', 'F', 'C', 'T', 'L'}

const (
	ctrlOffUUID  = 8
	ctrlOffBoot  = 24
	ctrlOffID    = 40
	ctrlOffCount = 48
)

func ctrlCount(ctrl []byte) *uint32 {
	return (*uint32)(unsafe.Pointer(&ctrl[ctrlOffCount]))
}

func setCtrl(ctrl []byte, uuid, boot [16]byte, id uint64) {
	atomic.StoreUint32(ctrlCount(ctrl), 0)
	copy(ctrl[0:8], ctrlMagic[:])
	copy(ctrl[ctrlOffUUID:], uuid[:])
	copy(ctrl[ctrlOffBoot:], boot[:])
	binary.LittleEndian.PutUint64(ctrl[ctrlOffID:], id)
}

func readCtrl(ctrl []byte, uuid, boot [16]byte) (id uint64, count int, ok bool) {
	if !bytes.Equal(ctrl[0:8], ctrlMagic[:]) ||
		!bytes.Equal(ctrl[ctrlOffUUID:ctrlOffUUID+16], uuid[:]) ||
		!bytes.Equal(ctrl[ctrlOffBoot:ctrlOffBoot+16], boot[:]) {
		return 0, 0, false
	}
	return binary.LittleEndian.Uint64(ctrl[ctrlOffID:]), int(atomic.LoadUint32(ctrlCount(ctrl))), true
}

// bootID identifies the running kernel boot; memory from another boot is
// never trusted.
func bootID() [16]byte {
	var id [16]byte
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return id
	}
	s := bytes.ReplaceAll(bytes.TrimSpace(b), []byte("-"), nil)
	for i := 0; i < 16 && 2*i+1 < len(s); i++ {
		fmt.Sscanf(string(s[2*i:2*i+2]), "%02x", &id[i])
	}
	return id
}
