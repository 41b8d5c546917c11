package engine

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"syscall"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// Errors callers can test for with errors.Is. Each wraps the errno that a
// block protocol (NBD) should report for it, so errors.Is(err, syscall.EIO)
// and friends also work.
var (
	ErrClosed     = fmt.Errorf("engine: closed: %w", syscall.ESHUTDOWN)
	ErrOutOfRange = fmt.Errorf("engine: request out of range: %w", syscall.EINVAL)
	ErrUnaligned  = fmt.Errorf("engine: request not aligned to 512 bytes: %w", syscall.EINVAL)
	// ErrIO wraps every device error that reaches a caller.
	ErrIO = fmt.Errorf("engine: I/O error: %w", syscall.EIO)

	ErrBlank         = errors.New("engine: cache device is blank (not formatted)")
	ErrForeign       = errors.New("engine: cache device holds something other than a writeboost cache")
	ErrNewerFormat   = errors.New("engine: cache was written by a newer format version")
	ErrBackingSize   = errors.New("engine: cache was made for a backing device of another size")
	ErrCorrupt       = errors.New("engine: cache metadata is corrupt")
	ErrStaticTunable = errors.New("engine: tunable can only be set when the cache is opened")
	ErrUnknownKey    = errors.New("engine: unknown tunable")
)

// Tunables are the dm-writeboost knobs, under their dm-writeboost names.
type Tunables struct {
	WritebackThreshold     int  `json:"writeback_threshold"`
	NrMaxBatchedWriteback  int  `json:"nr_max_batched_writeback"`
	UpdateSbRecordInterval int  `json:"update_sb_record_interval"`
	SyncDataInterval       int  `json:"sync_data_interval"`
	ReadCacheThreshold     int  `json:"read_cache_threshold"`
	WriteAroundMode        bool `json:"write_around_mode"`
	CleanThreshold         int  `json:"clean_threshold"`
}

// TunableSpec describes one tunable: the single source of truth for its
// name, range, default and whether it can change while the cache runs.
// The CLI flags, the control socket and the StorageClass parser all use it.
type TunableSpec struct {
	Name    string // dm-writeboost name, e.g. "writeback_threshold"
	Min     int
	Max     int
	Default int
	Online  bool // may be changed while running
	Unit    string
	Help    string
}

// TunableSpecs lists every tunable.
var TunableSpecs = []TunableSpec{
	{Name: "writeback_threshold", Min: 0, Max: 100, Default: 70, Online: true, Unit: "%",
		Help: "background writeback runs only while backing utilisation is below this; 0 disables background writeback (writeback then runs only when the log is three-quarters full, or on drain)"},
	{Name: "nr_max_batched_writeback", Min: 1, Max: 32, Default: 32, Online: true, Unit: "segments",
		Help: "segments written back per batch (part-full segments count by their blocks); larger batches sort more blocks into fewer HDD seeks"},
	{Name: "update_sb_record_interval", Min: 0, Max: 3600, Default: 60, Online: true, Unit: "s",
		Help: "seconds between checkpoint records of the written-back position; 0 writes them only when the log needs the space"},
	{Name: "sync_data_interval", Min: 0, Max: 3600, Default: 0, Online: true, Unit: "s",
		Help: "seconds between forced flushes of the RAM buffer to the cache device; 0 flushes only on FLUSH/FUA or a full buffer"},
	{Name: "read_cache_threshold", Min: 0, Max: 127, Default: 0, Online: true, Unit: "blocks",
		Help: "cache full-block read misses, except sequential runs longer than this many blocks; 0 disables the read cache"},
	{Name: "write_around_mode", Min: 0, Max: 1, Default: 0, Online: false, Unit: "bool",
		Help: "when on, writes bypass the cache and go to the backing device durably; the cache serves reads only"},
	{Name: "clean_threshold", Min: 0, Max: 90, Default: 50, Online: true, Unit: "%",
		Help: "when the log is three-quarters full, its oldest segments holding at most this share of live dirty blocks are cleaned (the blocks copied forward in the cache) instead of written back, at most 1/(1-t) cache writes per new block; 0 disables cleaning (not in dm-writeboost)"},
}

// LookupTunable returns the spec of a tunable by name.
func LookupTunable(name string) (TunableSpec, bool) {
	for _, s := range TunableSpecs {
		if s.Name == name {
			return s, true
		}
	}
	return TunableSpec{}, false
}

// DefaultTunables returns every tunable at its default.
func DefaultTunables() Tunables {
	var t Tunables
	for _, s := range TunableSpecs {
		if err := t.set(s, s.Default); err != nil {
			panic(err)
		}
	}
	return t
}

// Set parses and validates value and stores it under name.
func (t *Tunables) Set(name, value string) error {
	s, ok := LookupTunable(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownKey, name)
	}
	v, err := strconv.Atoi(value)
	if err != nil {
		if s.Unit == "bool" {
			if b, berr := strconv.ParseBool(value); berr == nil {
				v = 0
				if b {
					v = 1
				}
				err = nil
			}
		}
		if err != nil {
			return fmt.Errorf("tunable %s: %q is not an integer", name, value)
		}
	}
	return t.set(s, v)
}

func (t *Tunables) set(s TunableSpec, v int) error {
	if v < s.Min || v > s.Max {
		return fmt.Errorf("tunable %s: %d is out of range [%d, %d]", s.Name, v, s.Min, s.Max)
	}
	switch s.Name {
	case "writeback_threshold":
		t.WritebackThreshold = v
	case "nr_max_batched_writeback":
		t.NrMaxBatchedWriteback = v
	case "update_sb_record_interval":
		t.UpdateSbRecordInterval = v
	case "sync_data_interval":
		t.SyncDataInterval = v
	case "read_cache_threshold":
		t.ReadCacheThreshold = v
	case "write_around_mode":
		t.WriteAroundMode = v != 0
	case "clean_threshold":
		t.CleanThreshold = v
	default:
		return fmt.Errorf("%w: %q", ErrUnknownKey, s.Name)
	}
	return nil
}

// Validate checks every field against its spec.
func (t Tunables) Validate() error {
	var c Tunables
	for _, kv := range t.Map() {
		if err := c.Set(kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// Map returns name/value pairs in TunableSpecs order.
func (t Tunables) Map() [][2]string {
	b := func(v bool) string {
		if v {
			return "1"
		}
		return "0"
	}
	return [][2]string{
		{"writeback_threshold", strconv.Itoa(t.WritebackThreshold)},
		{"nr_max_batched_writeback", strconv.Itoa(t.NrMaxBatchedWriteback)},
		{"update_sb_record_interval", strconv.Itoa(t.UpdateSbRecordInterval)},
		{"sync_data_interval", strconv.Itoa(t.SyncDataInterval)},
		{"read_cache_threshold", strconv.Itoa(t.ReadCacheThreshold)},
		{"write_around_mode", b(t.WriteAroundMode)},
		{"clean_threshold", strconv.Itoa(t.CleanThreshold)},
	}
}

// Options configure Open.
type Options struct {
	Cache   blockdev.Device // the fast device holding the log
	Backing blockdev.Device // the slow device being cached

	// Format a blank cache device. A device that holds something else
	// (foreign data, a cache for another backing size) is still refused.
	Format bool
	// Reformat destroys whatever the cache device holds and formats it.
	// Dirty data of an old cache is lost: callers drain first.
	Reformat bool
	// SegmentSize in bytes when formatting (default 512 KiB; a multiple of
	// 4 KiB between 16 KiB and 1 MiB).
	SegmentSize int

	// RAMBuffers is the number of segment-sized RAM buffers (default 16,
	// 8 MiB of 512 KiB segments, or a quarter of a smaller ring; see
	// defaultBuffers).
	RAMBuffers int
	// Buffer holds the RAM buffers. Memory that outlives the process (a
	// shared mapping of a file, see OpenBufferFile) makes acknowledged but
	// unflushed writes survive a kill of the process; nil uses the heap.
	Buffer BufferMemory
	// BufferPath, when Buffer is nil, names a file to map as Buffer
	// (OpenBufferFile); put it on tmpfs (/run, /dev/shm).
	BufferPath string
	// AllowBackingGrowth accepts a backing device larger than the one the
	// cache was made for (a volume expansion) and records the new size.
	// A smaller backing device is always refused.
	AllowBackingGrowth bool
	// BackingDiscard passes TRIM down to the backing device (which must
	// implement blockdev.Discarder), freeing its space. Only for a
	// thin-provisioned backing device whose pool asks for it: a pool that
	// promised the space (fallocated files, thick LVs) must keep it, and
	// an HDD gains nothing. Off, TRIM costs the backing device nothing.
	BackingDiscard bool

	Tunables Tunables
	// Clock drives timers (intervals, utilisation); nil is the real clock.
	Clock Clock
	// Name labels logs (a volume id).
	Name string
	// stepping: start no goroutines; background work runs when a test
	// steps it or a waiting operation needs it (step.go). Tests only.
	stepping bool

	// Context bounds Open's long parts (reading the log, re-applying
	// discards, a write-around drain); nil is context.Background(). An
	// open abandoned part-way leaves the cache as a crash would, which
	// recovery is built for.
	Context context.Context
}

// DrainProgress reports how far a Drain has come.
type DrainProgress struct {
	DirtyBlocks   uint64 `json:"dirty_blocks"`
	InitialDirty  uint64 `json:"initial_dirty"`
	WrittenBlocks uint64 `json:"written_blocks"`
}

// Status is the engine's state, with dm-writeboost's field names.
type Status struct {
	Cursor             uint64 `json:"cursor"`
	NrCacheBlocks      uint64 `json:"nr_cache_blocks"`
	NrSegments         uint64 `json:"nr_segments"`
	CurrentID          uint64 `json:"current_id"`
	LastFlushedID      uint64 `json:"last_flushed_id"`
	LastWritebackID    uint64 `json:"last_writeback_id"`
	NrDirtyCacheBlocks uint64 `json:"nr_dirty_cache_blocks"`
	// PendingZeroBlocks: blocks of WRITE_ZEROES records that read as
	// zeros but are not zeroed on the backing device yet (writeback owes
	// them; overlapping records count twice).
	PendingZeroBlocks uint64 `json:"pending_zero_blocks"`
	NrPartialFlushed  uint64 `json:"nr_partial_flushed"`
	// IndexBytes is the RAM the block index holds (fixed at open: one
	// entry per cache block plus the hash table).
	IndexBytes uint64 `json:"index_bytes"`
	// Memory is what the engine holds in RAM now (memory.go).
	Memory Memory `json:"memory"`
	// PacedWrites counts writes slowed because the ring was nearly full
	// (see the engine's pace.go).
	PacedWrites uint64 `json:"paced_writes"`
	// WritebackFilledBlocks counts blocks written back early to fill a gap
	// between blocks of a batch (see the engine's writeback.go).
	WritebackFilledBlocks uint64 `json:"writeback_filled_blocks"`
	// Cleaning is what the log's cleaner did (see the engine's clean.go).
	Cleaning               CleaningStatus `json:"cleaning"`
	Stat                   Counters       `json:"stat"`
	WritebackBytes         uint64         `json:"writeback_bytes"`
	WritebackBytesPerSec   float64        `json:"writeback_bytes_per_sec"`
	ReadHitRatio           float64        `json:"read_hit_ratio"`
	WriteHitRatio          float64        `json:"write_hit_ratio"`
	BackingUtilization     float64        `json:"backing_utilization"`
	FlushCount             uint64         `json:"flush_count"`
	FlushLatencySecondsSum float64        `json:"flush_latency_seconds_sum"`
	CacheIOErrors          uint64         `json:"cache_io_errors"`
	BackingIOErrors        uint64         `json:"backing_io_errors"`
	LastError              string         `json:"last_error,omitempty"`
	// Health is the volume's state and its causes (health.go).
	Health      Health   `json:"health"`
	CacheSize   int64    `json:"cache_size"`
	BackingSize int64    `json:"backing_size"`
	SegmentSize int      `json:"segment_size"`
	UUID        string   `json:"uuid"`
	Tunables    Tunables `json:"tunables"`
}

// Counters are dm-writeboost's 16 hit/miss counters, named
// <read|write>_<hit|miss>_<buffer|cache>_<full|partial>. A "buffer" hit
// is served by a RAM buffer, a "cache" hit by the cache device; for
// misses the location names where the request would have been served.
type Counters struct {
	ReadHitBufferFull      uint64 `json:"read_hit_buffer_full"`
	ReadHitBufferPartial   uint64 `json:"read_hit_buffer_partial"`
	ReadHitCacheFull       uint64 `json:"read_hit_cache_full"`
	ReadHitCachePartial    uint64 `json:"read_hit_cache_partial"`
	ReadMissBufferFull     uint64 `json:"read_miss_buffer_full"`
	ReadMissBufferPartial  uint64 `json:"read_miss_buffer_partial"`
	ReadMissCacheFull      uint64 `json:"read_miss_cache_full"`
	ReadMissCachePartial   uint64 `json:"read_miss_cache_partial"`
	WriteHitBufferFull     uint64 `json:"write_hit_buffer_full"`
	WriteHitBufferPartial  uint64 `json:"write_hit_buffer_partial"`
	WriteHitCacheFull      uint64 `json:"write_hit_cache_full"`
	WriteHitCachePartial   uint64 `json:"write_hit_cache_partial"`
	WriteMissBufferFull    uint64 `json:"write_miss_buffer_full"`
	WriteMissBufferPartial uint64 `json:"write_miss_buffer_partial"`
	WriteMissCacheFull     uint64 `json:"write_miss_cache_full"`
	WriteMissCachePartial  uint64 `json:"write_miss_cache_partial"`
}
