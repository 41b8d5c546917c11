package params

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

func TestParseDefaults(t *testing.T) {
	v, err := Parse(map[string]string{"csi.storage.k8s.io/pvc/name": "x"})
	if err != nil {
		t.Fatal(err)
	}
	if v.Tunables != engine.DefaultTunables() || v.CacheSize != 0 || v.FSType != "" {
		t.Fatalf("defaults: %+v", v)
	}
}

func TestParseAll(t *testing.T) {
	v, err := Parse(map[string]string{
		"cacheSize": "1Gi", "writebackThreshold": "0", "maxBatchedWriteback": "8",
		"updateSbRecordInterval": "3600", "syncDataInterval": "5", "readCacheThreshold": "127",
		"writeAround": "true", "cleanThreshold": "80", "csi.storage.k8s.io/fstype": "xfs",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := engine.Tunables{WritebackThreshold: 0, NrMaxBatchedWriteback: 8, UpdateSbRecordInterval: 3600,
		SyncDataInterval: 5, ReadCacheThreshold: 127, WriteAroundMode: true, CleanThreshold: 80}
	if v.Tunables != want || v.CacheSize != 1<<30 || v.FSType != "xfs" {
		t.Fatalf("got %+v", v)
	}
}

func TestParseErrorsNameKeyAndRange(t *testing.T) {
	for _, tc := range []struct {
		key, val, want string
	}{
		{"writebackThreshold", "101", "[0, 100]"},
		{"writebackThreshold", "-1", "[0, 100]"},
		{"maxBatchedWriteback", "0", "[1, 32]"},
		{"maxBatchedWriteback", "abc", "[1, 32]"},
		{"updateSbRecordInterval", "3601", "[0, 3600]"},
		{"syncDataInterval", "1.5", "[0, 3600]"},
		{"readCacheThreshold", "128", "[0, 127]"},
		{"writeAround", "yes", `"true" or "false"`},
		{"csi.storage.k8s.io/fstype", "btrfs", "ext4, xfs"},
		{"cacheSize", "lots", "positive size"},
		{"cacheSize", "0", "positive size"},
		{"cacheSize", "-1Gi", "positive size"},
		{"cacheSize", "4Mi", "minimum of 8Mi"},
		{"colour", "blue", "unknown parameter"},
	} {
		_, err := Parse(map[string]string{tc.key: tc.val, "writeAround": "false"})
		var pe *Error
		if !errors.As(err, &pe) {
			t.Fatalf("%s=%s: error %v is not *Error", tc.key, tc.val, err)
		}
		if pe.Key != tc.key || !strings.Contains(pe.Msg, tc.want) {
			t.Errorf("%s=%s: got key %q msg %q, want key named and %q", tc.key, tc.val, pe.Key, pe.Msg, tc.want)
		}
	}
}

func TestRangesComeFromEngine(t *testing.T) {
	for _, k := range Keys() {
		s, ok := Spec(k)
		if !ok {
			continue
		}
		if s.Unit == "bool" {
			continue
		}
		if _, err := Parse(map[string]string{k: strconv.Itoa(s.Max)}); err != nil {
			t.Errorf("%s=%d (max) rejected: %v", k, s.Max, err)
		}
		if _, err := Parse(map[string]string{k: strconv.Itoa(s.Max + 1)}); err == nil {
			t.Errorf("%s=%d (max+1) accepted", k, s.Max+1)
		}
	}
}

func TestParseQuantity(t *testing.T) {
	for in, want := range map[string]int64{
		"1Gi": 1 << 30, "512Mi": 512 << 20, "1G": 1e9, "100": 100, "1.5Gi": 3 << 29, "64Ki": 64 << 10, "1e6": 1e6,
	} {
		got, err := ParseQuantity(in)
		if err != nil || got != want {
			t.Errorf("%s: got %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "Gi", "1.1", "x1", "-5", "1Zi"} {
		if _, err := ParseQuantity(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func TestMarkdownMentionsEveryKey(t *testing.T) {
	md := Markdown()
	for _, k := range Keys() {
		if !strings.Contains(md, "`"+k+"`") {
			t.Errorf("%s missing from the table", k)
		}
	}
}

func TestRAMBufferSize(t *testing.T) {
	v, err := Parse(map[string]string{"ramBufferSize": "3Mi"})
	if err != nil {
		t.Fatal(err)
	}
	if v.RAMBufferSize != 3<<20 || v.RAMBuffers(512<<10) != 6 || v.RAMBuffers(1<<20) != 3 {
		t.Fatalf("3Mi: %+v, %d buffers of 512 KiB", v, v.RAMBuffers(512<<10))
	}
	if v, _ := Parse(map[string]string{"ramBufferSize": "700Ki"}); v.RAMBuffers(512<<10) != 2 {
		t.Fatalf("700Ki rounds up to 2 buffers of 512 KiB, got %d", v.RAMBuffers(512<<10))
	}
	if v, _ := Parse(nil); v.RAMBuffers(512<<10) != 0 {
		t.Fatal("no ramBufferSize must leave the engine's default (0)")
	}
	for _, bad := range []string{"0", "100Ki", "257Mi", "1Gi", "x", "-1Mi"} {
		_, err := Parse(map[string]string{"ramBufferSize": bad})
		var pe *Error
		if !errors.As(err, &pe) || pe.Key != KeyRAMBufferSize || !strings.Contains(pe.Msg, "256Mi") {
			t.Errorf("ramBufferSize %q: %v", bad, err)
		}
	}
	if err := v.CheckRAMBuffers(6 << 20); err != nil {
		t.Errorf("3Mi on a 6Mi slice: %v", err)
	}
	var pe *Error
	if err := v.CheckRAMBuffers(6<<20 - 4096); !errors.As(err, &pe) || pe.Key != KeyRAMBufferSize {
		t.Errorf("3Mi on a slice of less than 6Mi: %v", err)
	}
}
