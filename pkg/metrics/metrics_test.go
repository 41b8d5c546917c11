package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
)

func TestCollector(t *testing.T) {
	c := NewCollector("node-a", func() map[string]engine.Status {
		return map[string]engine.Status{"vol-1": {NrDirtyCacheBlocks: 3, CurrentID: 10, LastWritebackID: 4,
			ReadHitRatio: 0.5, FlushCount: 2, FlushLatencySecondsSum: 0.25, CacheIOErrors: 1}}
	})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP writeboost_dirty_bytes Bytes in the cache not yet written back to the backing device.
# TYPE writeboost_dirty_bytes gauge
writeboost_dirty_bytes{node="node-a",volume="vol-1"} 12288
# HELP writeboost_writeback_lag_segments Segments written to the cache but not yet written back (current_id - last_writeback_id).
# TYPE writeboost_writeback_lag_segments gauge
writeboost_writeback_lag_segments{node="node-a",volume="vol-1"} 6
# HELP writeboost_io_errors_total I/O errors seen on a device.
# TYPE writeboost_io_errors_total counter
writeboost_io_errors_total{device="backing",node="node-a",volume="vol-1"} 0
writeboost_io_errors_total{device="cache",node="node-a",volume="vol-1"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "writeboost_dirty_bytes",
		"writeboost_writeback_lag_segments", "writeboost_io_errors_total"); err != nil {
		t.Fatal(err)
	}
}

func TestCollectorPools(t *testing.T) {
	c := NewCollector("node-a", func() map[string]engine.Status { return nil }).WithPools(func() map[string]pool.WipeStatus {
		return map[string]pool.WipeStatus{"hdd": {PendingBytes: 1 << 30, WipedBytes: 4096}}
	})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP writeboost_pool_wipe_pending_bytes Bytes of deleted volumes (or adopted free space) still being zeroed; they are not free for new volumes until wiped.
# TYPE writeboost_pool_wipe_pending_bytes gauge
writeboost_pool_wipe_pending_bytes{node="node-a",pool="hdd"} 1.073741824e+09
# HELP writeboost_pool_wiped_bytes_total Bytes zeroed and handed back to the pool by its wiper since the plugin started.
# TYPE writeboost_pool_wiped_bytes_total counter
writeboost_pool_wiped_bytes_total{node="node-a",pool="hdd"} 4096
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "writeboost_pool_wipe_pending_bytes", "writeboost_pool_wiped_bytes_total"); err != nil {
		t.Fatal(err)
	}
}

func TestCollectorMemory(t *testing.T) {
	c := NewCollector("node-a", func() map[string]engine.Status {
		return map[string]engine.Status{"vol-1": {Memory: engine.Memory{Index: 100, Buffers: 20, Scratch: 3}}}
	}).WithBudget(func() (int64, map[string]int64) { return 1000, map[string]int64{"vol-1": 400} })
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP writeboost_memory_budget_bytes The node plugin's memory budget: staging is refused beyond it.
# TYPE writeboost_memory_budget_bytes gauge
writeboost_memory_budget_bytes{node="node-a"} 1000
# HELP writeboost_memory_budget_reserved_bytes Memory reserved by the staged volumes of the node, out of writeboost_memory_budget_bytes.
# TYPE writeboost_memory_budget_reserved_bytes gauge
writeboost_memory_budget_reserved_bytes{node="node-a"} 400
# HELP writeboost_memory_reserved_bytes Worst-case memory reserved for the volume in the node's memory budget (index + buffers + scratch + NBD requests in flight).
# TYPE writeboost_memory_reserved_bytes gauge
writeboost_memory_reserved_bytes{node="node-a",volume="vol-1"} 400
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "writeboost_memory_budget_bytes",
		"writeboost_memory_budget_reserved_bytes", "writeboost_memory_reserved_bytes"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(c, "writeboost_memory_bytes"); n != 3 {
		t.Fatalf("%d writeboost_memory_bytes series, want 3 (index, buffers, scratch)", n)
	}
}

func TestCollectorCleaning(t *testing.T) {
	c := NewCollector("node-a", func() map[string]engine.Status {
		return map[string]engine.Status{"vol-1": {Cleaning: engine.CleaningStatus{CleanedBlocks: 40, CleanedSegments: 7,
			WrittenBackSegments: 2, CacheWriteAmplification: 1.25}}}
	})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP writeboost_cache_write_amplification Blocks appended to the cache's log per block written by the volume's users since the volume was opened (1 without cleaning).
# TYPE writeboost_cache_write_amplification gauge
writeboost_cache_write_amplification{node="node-a",volume="vol-1"} 1.25
# HELP writeboost_cleaned_blocks_total Live dirty blocks the log's cleaner copied forward in the cache instead of waiting for writeback.
# TYPE writeboost_cleaned_blocks_total counter
writeboost_cleaned_blocks_total{node="node-a",volume="vol-1"} 40
# HELP writeboost_reclaimed_segments_total Oldest log segments whose ring slots were freed, by how: cleaned (live blocks copied forward) or written back.
# TYPE writeboost_reclaimed_segments_total counter
writeboost_reclaimed_segments_total{by="cleaning",node="node-a",volume="vol-1"} 7
writeboost_reclaimed_segments_total{by="writeback",node="node-a",volume="vol-1"} 2
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "writeboost_cache_write_amplification",
		"writeboost_cleaned_blocks_total", "writeboost_reclaimed_segments_total"); err != nil {
		t.Fatal(err)
	}
}

// TestCollectorHealth: the engine's health state and causes are exported
// one series per state and cause (1 for those that apply), with the lost
// flushed segments, stranded bytes, paced writes and recovering volumes.
func TestCollectorHealth(t *testing.T) {
	c := NewCollector("node-a", func() map[string]engine.Status {
		return map[string]engine.Status{
			"vol-1": {PacedWrites: 7, Health: engine.Health{State: engine.HealthFailed, StrandedBlocks: 2, LostFlushedSegments: 1,
				Causes: []engine.Cause{{Kind: engine.CauseCacheFailed}, {Kind: engine.CauseLostFlushedSegments}}}},
			"vol-2": {Health: engine.Health{State: engine.HealthOK}},
		}
	}).WithRecovering(func() []string { return []string{"vol-3"} })
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP writeboost_lost_flushed_segments Log segments the checkpoint recorded as durable that recovery found blank or corrupt when the volume was opened (a cache device that ignores flushes).
# TYPE writeboost_lost_flushed_segments gauge
writeboost_lost_flushed_segments{node="node-a",volume="vol-1"} 1
writeboost_lost_flushed_segments{node="node-a",volume="vol-2"} 0
# HELP writeboost_stranded_dirty_bytes Bytes whose newest data was only on the cache device when it failed: reads of them fail with EIO until the cache is recovered.
# TYPE writeboost_stranded_dirty_bytes gauge
writeboost_stranded_dirty_bytes{node="node-a",volume="vol-1"} 8192
writeboost_stranded_dirty_bytes{node="node-a",volume="vol-2"} 0
# HELP writeboost_paced_writes_total Writes slowed because the cache's log was nearly full (the backing device is the bottleneck).
# TYPE writeboost_paced_writes_total counter
writeboost_paced_writes_total{node="node-a",volume="vol-1"} 7
writeboost_paced_writes_total{node="node-a",volume="vol-2"} 0
# HELP writeboost_volume_recovering 1 while a staged volume's cache is being reopened and its log replayed after a restart of the plugin; its I/O waits until then.
# TYPE writeboost_volume_recovering gauge
writeboost_volume_recovering{node="node-a",volume="vol-3"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "writeboost_lost_flushed_segments",
		"writeboost_stranded_dirty_bytes", "writeboost_paced_writes_total", "writeboost_volume_recovering"); err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "writeboost_health_state" && mf.GetName() != "writeboost_health_cause" {
			continue
		}
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				if l.GetName() != "node" {
					key += "," + l.GetValue()
				}
			}
			got[key] = m.GetGauge().GetValue()
		}
	}
	if len(got) != 2*(len(engine.HealthStates)+len(engine.CauseKinds)) {
		t.Fatalf("%d health series, want every state and cause for each of 2 volumes: %v", len(got), got)
	}
	for key, want := range map[string]float64{
		"writeboost_health_state,failed,vol-1":                1,
		"writeboost_health_state,ok,vol-1":                    0,
		"writeboost_health_state,ok,vol-2":                    1,
		"writeboost_health_cause,cache_failed,vol-1":          1,
		"writeboost_health_cause,lost_flushed_segments,vol-1": 1,
		"writeboost_health_cause,writeback_failing,vol-1":     0,
		"writeboost_health_cause,cache_failed,vol-2":          0,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
}
