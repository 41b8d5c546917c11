// Package params parses the StorageClass parameters of writeboost.csi.io
// volumes. It is the one parser of those parameters: the CSI driver calls
// it in CreateVolume and NodeStageVolume, and the Helm chart's tests call it
// on the parameters they render, so a StorageClass that the chart produces
// is one the driver accepts. Ranges and defaults of the engine tunables come
// from engine.TunableSpecs and are never repeated here.
package params

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"sort"
	"strconv"
	"strings"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// Parameter keys.
const (
	KeyCacheSize              = "cacheSize"
	KeyRAMBufferSize          = "ramBufferSize"
	KeyWritebackThreshold     = "writebackThreshold"
	KeyMaxBatchedWriteback    = "maxBatchedWriteback"
	KeyUpdateSbRecordInterval = "updateSbRecordInterval"
	KeySyncDataInterval       = "syncDataInterval"
	KeyReadCacheThreshold     = "readCacheThreshold"
	KeyWriteAround            = "writeAround"
	KeyCleanThreshold         = "cleanThreshold"
	KeyFSType                 = "csi.storage.k8s.io/fstype"

	// sidecarPrefix marks keys added by the external sidecars
	// (csi-provisioner's pvc/pv name and namespace): ignored.
	sidecarPrefix = "csi.storage.k8s.io/"
)

// tunableKeys maps each camelCase StorageClass key to the engine tunable
// (dm-writeboost name) it sets.
var tunableKeys = map[string]string{
	KeyWritebackThreshold:     "writeback_threshold",
	KeyMaxBatchedWriteback:    "nr_max_batched_writeback",
	KeyUpdateSbRecordInterval: "update_sb_record_interval",
	KeySyncDataInterval:       "sync_data_interval",
	KeyReadCacheThreshold:     "read_cache_threshold",
	KeyWriteAround:            "write_around_mode",
	KeyCleanThreshold:         "clean_threshold",
}

// FSTypes are the filesystems the driver formats.
var FSTypes = []string{"ext4", "xfs"}

// MinCacheSize is the smallest cacheSize accepted: the engine needs its
// 1 MiB superblock area plus a ring of more segments than RAM buffers.
const MinCacheSize = 8 << 20

// RAM buffer sizes accepted: at least one segment, at most 256 MiB (the
// RAM buffers of every staged volume live in the plugin pod's memory).
const (
	MinRAMBufferSize = int64(layout.DefaultSegmentSize)
	MaxRAMBufferSize = 256 << 20
)

// DefaultFSType is used when the StorageClass gives none.
const DefaultFSType = "ext4"

// Volume is a parsed parameter set.
type Volume struct {
	// CacheSize in bytes; 0 when not given (the driver then uses the
	// configured fraction of the volume).
	CacheSize int64
	// RAMBufferSize in bytes; 0 when not given (the engine's default:
	// 16 segments, 8 MiB, fewer on a small cache slice).
	RAMBufferSize int64
	// FSType is "" when not given.
	FSType string
	// Tunables holds every tunable: the given values over the defaults.
	Tunables engine.Tunables
}

// Error is a parameter that was rejected. Msg names the allowed range.
type Error struct {
	Key string
	Msg string
}

func (e *Error) Error() string { return fmt.Sprintf("parameter %q: %s", e.Key, e.Msg) }

// Parse validates every key of m and returns the volume's settings. The
// first bad key (in sorted key order, so the error is deterministic) is
// returned as *Error.
func Parse(m map[string]string) (*Volume, error) {
	v := &Volume{Tunables: engine.DefaultTunables()}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		val := strings.TrimSpace(m[k])
		switch {
		case k == KeyCacheSize:
			n, err := ParseQuantity(val)
			if err != nil || n <= 0 {
				return nil, &Error{Key: k, Msg: fmt.Sprintf("%q is not a positive size (examples: 1Gi, 512Mi, 1073741824)", m[k])}
			}
			if n < MinCacheSize {
				return nil, &Error{Key: k, Msg: fmt.Sprintf("%q is below the minimum of 8Mi (the cache holds its superblock and a ring of several segments)", m[k])}
			}
			v.CacheSize = n
		case k == KeyRAMBufferSize:
			n, err := ParseQuantity(val)
			if err != nil || n < MinRAMBufferSize || n > MaxRAMBufferSize {
				return nil, &Error{Key: k, Msg: fmt.Sprintf("%q is not a size from 512Ki to 256Mi (examples: 8Mi, 64Mi)", m[k])}
			}
			v.RAMBufferSize = n
		case k == KeyFSType:
			if !isFSType(val) {
				return nil, &Error{Key: k, Msg: fmt.Sprintf("%q is not supported; allowed: %s", m[k], strings.Join(FSTypes, ", "))}
			}
			v.FSType = val
		case tunableKeys[k] != "":
			if err := setTunable(&v.Tunables, k, val); err != nil {
				return nil, err
			}
		case strings.HasPrefix(k, sidecarPrefix):
			// Added by the sidecars (PVC name, namespace...): not ours.
		default:
			return nil, &Error{Key: k, Msg: "unknown parameter; allowed: " + strings.Join(Keys(), ", ")}
		}
	}
	return v, nil
}

func setTunable(t *engine.Tunables, key, val string) error {
	spec, ok := engine.LookupTunable(tunableKeys[key])
	if !ok {
		return &Error{Key: key, Msg: "no such engine tunable"}
	}
	if spec.Unit == "bool" {
		b, err := strconv.ParseBool(val)
		if err != nil || (val != "true" && val != "false") {
			return &Error{Key: key, Msg: fmt.Sprintf("%q is not allowed; allowed: \"true\" or \"false\"", val)}
		}
		return t.Set(spec.Name, strconv.FormatBool(b))
	}
	n, err := strconv.Atoi(val)
	if err != nil || n < spec.Min || n > spec.Max {
		return &Error{Key: key, Msg: fmt.Sprintf("%q is not an integer in [%d, %d] (%s)", val, spec.Min, spec.Max, spec.Unit)}
	}
	if err := t.Set(spec.Name, val); err != nil {
		return &Error{Key: key, Msg: err.Error()}
	}
	return nil
}

func isFSType(s string) bool {
	for _, f := range FSTypes {
		if s == f {
			return true
		}
	}
	return false
}

// RAMBuffers is the number of RAM buffers of segmentSize bytes that
// RAMBufferSize asks for (rounded up), or 0 for the engine's default.
func (v *Volume) RAMBuffers(segmentSize int) int {
	if v.RAMBufferSize == 0 {
		return 0
	}
	return int((v.RAMBufferSize + int64(segmentSize) - 1) / int64(segmentSize))
}

// CheckRAMBuffers refuses a RAMBufferSize of more than half the cache
// slice of cacheSize bytes: the buffers wait for slots of the slice's
// ring, which must keep room for the log.
func (v *Volume) CheckRAMBuffers(cacheSize int64) error {
	if v.RAMBufferSize > 0 && v.RAMBufferSize > cacheSize/2 {
		return &Error{Key: KeyRAMBufferSize, Msg: fmt.Sprintf("%d bytes is more than half the volume's cache slice of %d bytes", v.RAMBufferSize, cacheSize)}
	}
	return nil
}

// Keys lists every accepted key, sorted.
func Keys() []string {
	keys := []string{KeyCacheSize, KeyRAMBufferSize, KeyFSType}
	for k := range tunableKeys {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Spec describes a tunable key for documentation and the chart: the engine
// spec behind a StorageClass key.
func Spec(key string) (engine.TunableSpec, bool) {
	name, ok := tunableKeys[key]
	if !ok {
		return engine.TunableSpec{}, false
	}
	return engine.LookupTunable(name)
}

// ParseQuantity parses a Kubernetes resource quantity of bytes: a plain
// integer, a binary suffix (Ki, Mi, Gi, Ti, Pi, Ei) or a decimal one (k, M,
// G, T, P, E). Fractions are allowed when the result is a whole number of
// bytes ("1.5Gi"). Exponent forms ("1e9") are accepted too.
func ParseQuantity(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("empty quantity")
	}
	suffixes := []struct {
		s string
		m float64
	}{
		{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"Pi", 1 << 50}, {"Ei", 1 << 60},
		{"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}, {"P", 1e15}, {"E", 1e18},
	}
	mult := 1.0
	num := s
	for _, suf := range suffixes {
		if strings.HasSuffix(s, suf.s) {
			mult = suf.m
			num = strings.TrimSuffix(s, suf.s)
			break
		}
	}
	if strings.ContainsAny(num, "+-") && !strings.ContainsAny(num, "eE") {
		if strings.HasPrefix(num, "-") {
			return 0, fmt.Errorf("%q is negative", s)
		}
	}
	// Plain decimals ("1073741824", "1.5Gi") are computed exactly: a float
	// rounds byte counts above 2^53 and refuses "1.1k" as fractional.
	if n, ok, err := parseDecimal(num, mult); ok {
		if err != nil {
			return 0, fmt.Errorf("%q %w", s, err)
		}
		return n, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("%q is not a quantity", s)
	}
	b := f * mult
	// float64(math.MaxInt64/2) rounds up to 2^62, itself out of range.
	if b < 0 || b >= float64(math.MaxInt64/2) {
		return 0, fmt.Errorf("%q is out of range", s)
	}
	if b != math.Trunc(b) {
		return 0, fmt.Errorf("%q is not a whole number of bytes", s)
	}
	return int64(b), nil
}

// parseDecimal reads num ([+]digits[.digits]) times mult exactly. ok is
// false when num has another form (exponents, signs), left to ParseFloat.
func parseDecimal(num string, mult float64) (n int64, ok bool, err error) {
	ip, fp, _ := strings.Cut(strings.TrimPrefix(num, "+"), ".")
	if ip == "" && fp == "" || !allDigits(ip) || !allDigits(fp) {
		return 0, false, nil
	}
	x, _ := new(big.Int).SetString(ip+fp+"0", 10) // "0": ip and fp may both be short
	x.Mul(x, big.NewInt(int64(mult)))
	scale := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(fp)+1)), nil)
	q, r := new(big.Int).QuoRem(x, scale, new(big.Int))
	if r.Sign() != 0 {
		return 0, true, errors.New("is not a whole number of bytes")
	}
	if !q.IsInt64() || q.Int64() > math.MaxInt64/2 {
		return 0, true, errors.New("is out of range")
	}
	return q.Int64(), true, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// Markdown documents every key as a table row, with ranges, defaults and
// effects taken from engine.TunableSpecs.
func Markdown() string {
	var b strings.Builder
	b.WriteString("| Parameter | Values | Default | Effect |\n|---|---|---|---|\n")
	b.WriteString("| `" + KeyCacheSize + "` | size (e.g. `1Gi`), at least `8Mi` | `defaultCacheFraction` of the volume, at least `minCacheSize` | " +
		"size of the volume's cache slice on the NVMe pool: the burst of writes absorbed at NVMe speed and the working set served from it |\n")
	b.WriteString("| `" + KeyRAMBufferSize + "` | size from `512Ki` to `256Mi` (e.g. `64Mi`), at most half the cache slice | `8Mi` (fewer on a cache slice under 32 MiB) | " +
		"RAM taken by the volume's write buffers (segments being filled and waiting for the cache device): room for deep queues of large writes; counted in the node's memory budget |\n")
	b.WriteString("| `" + KeyFSType + "` | `ext4`, `xfs` | `ext4` | filesystem made on Mount volumes |\n")
	for _, k := range Keys() {
		s, ok := Spec(k)
		if !ok {
			continue
		}
		vals := fmt.Sprintf("%d-%d %s", s.Min, s.Max, s.Unit)
		def := strconv.Itoa(s.Default)
		if s.Unit == "bool" {
			vals, def = "`true`, `false`", strconv.FormatBool(s.Default != 0)
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s (engine tunable `%s`) |\n", k, vals, def, s.Help, s.Name)
	}
	return b.String()
}
