package params

import (
	"errors"
	"math"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// The fuzz targets feed arbitrary StorageClass parameters (user input from
// the Kubernetes API) to the parser. Whatever is refused must be a *Error
// naming a key of the map; whatever is accepted must be in range and must
// survive a round trip through the parameter spelling (encodeParams).

// encodeParams writes v back as a StorageClass parameter map, in the
// spellings Parse documents: the inverse of Parse for accepted input.
func encodeParams(v *Volume) map[string]string {
	m := map[string]string{}
	if v.CacheSize != 0 {
		m[KeyCacheSize] = strconv.FormatInt(v.CacheSize, 10)
	}
	if v.FSType != "" {
		m[KeyFSType] = v.FSType
	}
	byName := map[string]string{}
	for k, name := range tunableKeys {
		byName[name] = k
	}
	for _, kv := range v.Tunables.Map() {
		k := byName[kv[0]]
		val := kv[1]
		if s, _ := engine.LookupTunable(kv[0]); s.Unit == "bool" {
			val = strconv.FormatBool(val == "1")
		}
		m[k] = val
	}
	return m
}

// mapToLines and linesToMap carry a parameter map through the fuzzer,
// which only knows flat types: one "key=value" per line.
func mapToLines(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + "=" + m[k] + "\n")
	}
	return b.String()
}

func linesToMap(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		if line == "" {
			continue
		}
		k, v, _ := strings.Cut(line, "=")
		m[k] = v
	}
	return m
}

func FuzzParse(f *testing.F) {
	all := map[string]string{
		KeyCacheSize: "1Gi", KeyWritebackThreshold: "0", KeyMaxBatchedWriteback: "8",
		KeyUpdateSbRecordInterval: "3600", KeySyncDataInterval: "5", KeyReadCacheThreshold: "127",
		KeyWriteAround: "true", KeyCleanThreshold: "80", KeyFSType: "xfs", "csi.storage.k8s.io/pvc/name": "data",
	}
	f.Add(mapToLines(all))
	f.Add(mapToLines(encodeParams(&Volume{Tunables: engine.DefaultTunables()})))
	f.Add(mapToLines(encodeParams(&Volume{CacheSize: MinCacheSize, FSType: "ext4", Tunables: engine.DefaultTunables()})))
	f.Add("")
	f.Add("cacheSize=1.5Gi\nwriteAround= false \n")
	f.Add("cacheSize=4Mi\n")
	f.Add("cacheSize=-1Gi\ncolour=blue\n")
	f.Add("maxBatchedWriteback=0\nwritebackThreshold=101\n")
	f.Add("writeAround=1\n")
	f.Add("csi.storage.k8s.io/fstype=btrfs\n")
	f.Fuzz(func(t *testing.T, lines string) {
		m := linesToMap(lines)
		v, err := Parse(m)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("Parse(%q): error %v is not *Error", m, err)
			}
			if _, ok := m[pe.Key]; !ok {
				t.Fatalf("Parse(%q): error names %q, not a key of the map", m, pe.Key)
			}
			if !strings.Contains(err.Error(), strconv.Quote(pe.Key)) || pe.Msg == "" {
				t.Fatalf("Parse(%q): error %q does not name the parameter or say why", m, err)
			}
			// The key alone is refused too, and every key sorted before
			// it is fine: the error is about that key, deterministically.
			if _, err := Parse(map[string]string{pe.Key: m[pe.Key]}); err == nil {
				t.Fatalf("Parse(%q) blamed %q, which alone is accepted", m, pe.Key)
			}
			before := map[string]string{}
			for k, val := range m {
				if k < pe.Key {
					before[k] = val
				}
			}
			if _, err := Parse(before); err != nil {
				t.Fatalf("Parse(%q) blamed %q, but the keys before it fail too: %v", m, pe.Key, err)
			}
			return
		}
		if err := v.Tunables.Validate(); err != nil {
			t.Fatalf("Parse(%q) accepted out-of-range tunables: %v", m, err)
		}
		if v.CacheSize != 0 && v.CacheSize < MinCacheSize {
			t.Fatalf("Parse(%q) accepted cacheSize %d below the minimum", m, v.CacheSize)
		}
		if v.FSType != "" && !isFSType(v.FSType) {
			t.Fatalf("Parse(%q) accepted fstype %q", m, v.FSType)
		}
		enc := encodeParams(v)
		v2, err := Parse(enc)
		if err != nil {
			t.Fatalf("Parse(%q) = %+v, whose encoding %q is refused: %v", m, v, enc, err)
		}
		if *v2 != *v {
			t.Fatalf("Parse(%q) = %+v, re-encoded as %q parses to %+v", m, v, enc, v2)
		}
	})
}

func FuzzParseQuantity(f *testing.F) {
	for _, s := range []string{"1Gi", "512Mi", "1073741824", "1.5Gi", "1e9", "2k", "3E", "8Ei", "0", "-1Gi",
		"0.5", "Ki", " 7 ", "1e-3", "9007199254740993", "4611686018427387903", "NaN", "+Inf", "0x1p20"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseQuantity(s)
		if err != nil {
			if n != 0 {
				t.Fatalf("ParseQuantity(%q) = %d with error %v", s, n, err)
			}
			return
		}
		if n < 0 || n > math.MaxInt64/2 {
			t.Fatalf("ParseQuantity(%q) = %d, out of range", s, n)
		}
		// A plain integer is a byte count and must be read exactly, not
		// rounded through a float.
		if i, perr := strconv.ParseInt(strings.TrimSpace(s), 10, 64); perr == nil && i != n {
			t.Fatalf("ParseQuantity(%q) = %d, want %d", s, n, i)
		}
		// The canonical spellings of n give n back.
		enc := []string{strconv.FormatInt(n, 10)}
		for _, u := range []struct {
			suf string
			m   int64
		}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}} {
			if n%u.m == 0 {
				enc = append(enc, strconv.FormatInt(n/u.m, 10)+u.suf)
			}
		}
		for _, e := range enc {
			if n2, err := ParseQuantity(e); err != nil || n2 != n {
				t.Fatalf("ParseQuantity(%q) = %d, but its spelling %q gives %d, %v", s, n, e, n2, err)
			}
		}
	})
}
