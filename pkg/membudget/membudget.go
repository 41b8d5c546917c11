// Package membudget keeps the node plugin's memory within a budget. Every
// staged volume's data path lives in the plugin's process, so one OOM kill
// stops every volume on the node at once; instead, a volume is admitted
// only when its worst-case memory fits in what the budget has left, and
// refused with the figures otherwise.
//
// A volume's figure (Need) is the most its data path can hold:
//
//	index     ~13 bytes per 4 KiB cache block (8-byte entry + 4-byte hash
//	          slot at load <= 0.8), fixed when the cache is opened
//	buffers   RAM buffers: 4 x (512 KiB segment + 4 KiB), on tmpfs and
//	          charged to the pod's memory cgroup like heap
//	scratch   writeback: 32 segments' data (16 MiB at 512 KiB segments,
//	          at most half the ring) + one 4 MiB backing write; held only
//	          while writeback runs, reserved all the same
//	requests  NBD payloads in flight: 64 MiB per connection (pkg/nbd's
//	          default), min(CPUs, 4) connections on the kernel path
//
// The budget defaults to the plugin container's memory limit (its cgroup's
// memory.max) less a reserve for the rest of the process; without a limit,
// half the node's memory.
package membudget

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// ErrExhausted is wrapped by every refusal.
var ErrExhausted = errors.New("memory budget exhausted")

// ExhaustedError names the figures of a refusal.
type ExhaustedError struct {
	Volume string
	Need   int64 // what the volume needs
	InUse  int64 // what other volumes hold (or have committed)
	Budget int64
	What   string // "staged volumes" or "volumes on this node"
}

func (e *ExhaustedError) Error() string {
	return fmt.Sprintf("%v: volume %s needs %s of memory, %s hold %s of the %s budget (%s free)",
		ErrExhausted, e.Volume, Bytes(e.Need), e.What, Bytes(e.InUse), Bytes(e.Budget), Bytes(max(e.Budget-e.InUse, 0)))
}

// Unwrap makes errors.Is(err, ErrExhausted) work.
func (e *ExhaustedError) Unwrap() error { return ErrExhausted }

// Bytes formats n in binary units, exactly enough to compare figures.
func Bytes(n int64) string {
	switch {
	case n >= 1<<30:
		return strconv.FormatFloat(float64(n)/(1<<30), 'f', 2, 64) + " GiB"
	case n >= 1<<20:
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB"
	}
	return strconv.FormatInt(n, 10) + " B"
}

// Per-volume terms besides the engine's (see the package doc).
const (
	// nbdInFlightPerConn is pkg/nbd's default bound on payload bytes in
	// flight on one connection.
	nbdInFlightPerConn = 64 << 20
	// maxConnections is pkg/attach's default: min(CPUs, 4).
	maxConnections = 4
)

// RequestBytes is what a volume's NBD requests in flight can hold.
func RequestBytes() int64 {
	return int64(min(runtime.NumCPU(), maxConnections)) * nbdInFlightPerConn
}

// Need is the worst-case memory of a volume whose cache slice is
// cacheSize bytes with ramBuffers RAM buffers (0: the engine's default);
// a cache the format cannot address is an error.
func Need(cacheSize int64, ramBuffers int) (engine.Memory, int64, error) {
	m, err := engine.EstimateMemory(cacheSize, 0, ramBuffers)
	if err != nil {
		return m, 0, err
	}
	return m, m.Total() + RequestBytes(), nil
}

// Budget accounts the memory reserved by staged volumes.
type Budget struct {
	limit int64
	mu    sync.Mutex
	vols  map[string]int64
}

// New returns a budget of limit bytes (> 0).
func New(limit int64) *Budget { return &Budget{limit: limit, vols: map[string]int64{}} }

// Limit is the budget in bytes.
func (b *Budget) Limit() int64 { return b.limit }

// Reserve admits volume id with need bytes, or refuses it with an
// *ExhaustedError. A volume already admitted keeps its reservation (it is
// replaced by need, which may be refused like a new one).
func (b *Budget) Reserve(id string, need int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	others := b.inUseLocked() - b.vols[id]
	if others+need > b.limit {
		return &ExhaustedError{Volume: id, Need: need, InUse: others, Budget: b.limit, What: "staged volumes"}
	}
	b.vols[id] = need
	return nil
}

// Force counts volume id whatever the budget says: for volumes that are
// already running (a restarted plugin re-adopting them), which refusing
// would not free. It reports whether the budget is now exceeded.
func (b *Budget) Force(id string, need int64) (over bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.vols[id] = need
	return b.inUseLocked() > b.limit
}

// Release drops volume id's reservation.
func (b *Budget) Release(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.vols, id)
}

// InUse is the sum of the reservations.
func (b *Budget) InUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inUseLocked()
}

func (b *Budget) inUseLocked() int64 {
	var n int64
	for _, v := range b.vols {
		n += v
	}
	return n
}

// Reservations returns a copy of the reservations by volume.
func (b *Budget) Reservations() map[string]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]int64, len(b.vols))
	for k, v := range b.vols {
		out[k] = v
	}
	return out
}

// Commit checks that a new volume needing need bytes fits beside the
// volumes already on the node (committed bytes, staged or not: any of
// them may be staged later), so that CreateVolume refuses what NodeStage
// would.
func (b *Budget) Commit(id string, need, committed int64) error {
	if committed+need > b.limit {
		return &ExhaustedError{Volume: id, Need: need, InUse: committed, Budget: b.limit, What: "volumes on this node"}
	}
	return nil
}

// Reserve for the rest of the plugin process (Go runtime, gRPC, page
// cache of its own files) when the budget is derived from a limit.
const processReserve = 256 << 20

// DefaultLimit derives the budget from the memory limit of the cgroup the
// process runs in (v2 memory.max or v1 memory.limit_in_bytes) less a
// reserve for the rest of the process, or half the node's memory when
// there is no limit. It says where the figure came from.
func DefaultLimit() (int64, string) { return defaultLimit("/") }

func defaultLimit(root string) (int64, string) {
	if lim, src, ok := cgroupLimit(root); ok {
		return max(lim-processReserve, lim/2), fmt.Sprintf("%s = %s, less %s for the process", src, Bytes(lim), Bytes(min(processReserve, lim/2)))
	}
	if total, ok := memTotal(root); ok {
		return total / 2, fmt.Sprintf("no memory limit: half of MemTotal %s", Bytes(total))
	}
	return 1 << 30, "no memory limit and no /proc/meminfo: 1 GiB"
}

// cgroupLimit reads the memory limit of this process's cgroup.
func cgroupLimit(root string) (int64, string, bool) {
	b, err := os.ReadFile(root + "proc/self/cgroup")
	if err != nil {
		return 0, "", false
	}
	var cands []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		switch {
		case f[0] == "0" && f[1] == "": // v2
			cands = append(cands, "sys/fs/cgroup"+f[2]+"/memory.max", "sys/fs/cgroup/memory.max")
		case strings.Contains(","+f[1]+",", ",memory,"): // v1
			cands = append(cands, "sys/fs/cgroup/memory"+f[2]+"/memory.limit_in_bytes", "sys/fs/cgroup/memory/memory.limit_in_bytes")
		}
	}
	// Inside a container the cgroup is mounted at the root, outside at
	// its path; the v1 hierarchy comes first when both are listed.
	sort.SliceStable(cands, func(i, j int) bool {
		return strings.HasSuffix(cands[i], "limit_in_bytes") && !strings.HasSuffix(cands[j], "limit_in_bytes")
	})
	for _, c := range cands {
		b, err := os.ReadFile(root + c)
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(b))
		n, err := strconv.ParseInt(s, 10, 64)
		if s == "max" || err != nil || n <= 0 || n >= 1<<60 {
			continue // unlimited (v1 says 9223372036854771712)
		}
		return n, "/" + c, true
	}
	return 0, "", false
}

func memTotal(root string) (int64, bool) {
	b, err := os.ReadFile(root + "proc/meminfo")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, err == nil
		}
	}
	return 0, false
}
