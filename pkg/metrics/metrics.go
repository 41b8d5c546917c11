// Package metrics exports the cache engines' figures of a node's staged
// volumes to Prometheus, named writeboost_* with volume and node labels.
// Figures are read from each engine's Status at scrape time, so there is no
// second copy of the counters to drift.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
)

// Source lists the running volumes and their status.
type Source func() map[string]engine.Status

// blockSize is the engine's cache block.
const blockSize = 4096

// PoolSource reports the pools' background wipes by pool role (hdd, nvme).
type PoolSource func() map[string]pool.WipeStatus

// BudgetSource reports the node's memory budget and each staged volume's
// reservation in it.
type BudgetSource func() (budget int64, reserved map[string]int64)

// Collector is a prometheus.Collector over a Source.
type Collector struct {
	node   string
	src    Source
	pools  PoolSource
	budget BudgetSource

	wipePending, wiped               *prometheus.Desc
	memory, memReserved, budgetBytes *prometheus.Desc
	budgetReserved                   *prometheus.Desc

	dirty, cacheSize, backingSize, readHit, writeHit, wbRate, wbLag, util *prometheus.Desc
	wbBytes, flushes, flushSeconds, ioErrors                              *prometheus.Desc
	cleanedBlocks, reclaimedSegments, cacheWA                             *prometheus.Desc
	health, cause, lostSegments, stranded, paced                          *prometheus.Desc
	recovering                                                            *prometheus.Desc
	recoveringSrc                                                         func() []string
}

// NewCollector returns a collector labelling every series with node.
func NewCollector(node string, src Source) *Collector {
	l := []string{"volume", "node"}
	d := func(name, help string, extra ...string) *prometheus.Desc {
		return prometheus.NewDesc("writeboost_"+name, help, append(append([]string{}, l...), extra...), nil)
	}
	return &Collector{node: node, src: src,
		dirty:             d("dirty_bytes", "Bytes in the cache not yet written back to the backing device."),
		cacheSize:         d("cache_size_bytes", "Size of the cache slice."),
		backingSize:       d("backing_size_bytes", "Size of the backing volume."),
		readHit:           d("read_hit_ratio", "Fraction of reads served from RAM buffers or the cache device since the last clear_stat."),
		writeHit:          d("write_hit_ratio", "Fraction of writes that overwrote a cached block since the last clear_stat."),
		wbRate:            d("writeback_bytes_per_second", "Current rate of writeback to the backing device."),
		wbLag:             d("writeback_lag_segments", "Segments written to the cache but not yet written back (current_id - last_writeback_id)."),
		util:              d("backing_utilization_ratio", "Backing device utilisation as measured by the engine (0-1)."),
		wbBytes:           d("writeback_bytes_total", "Bytes written back to the backing device."),
		flushes:           d("flushes_total", "Flushes (FLUSH/FUA group commits) completed."),
		flushSeconds:      d("flush_latency_seconds_total", "Total time spent in flushes; divide by writeboost_flushes_total for the mean latency."),
		ioErrors:          d("io_errors_total", "I/O errors seen on a device.", "device"),
		cleanedBlocks:     d("cleaned_blocks_total", "Live dirty blocks the log's cleaner copied forward in the cache instead of waiting for writeback."),
		reclaimedSegments: d("reclaimed_segments_total", "Oldest log segments whose ring slots were freed, by how: cleaned (live blocks copied forward) or written back.", "by"),
		cacheWA:           d("cache_write_amplification", "Blocks appended to the cache's log per block written by the volume's users since the volume was opened (1 without cleaning)."),
		health: d("health_state", "1 for the volume's health state, 0 for the others: ok, degraded (serving, something needs attention: see writeboost_health_cause), "+
			"pass-through (the cache device failed with nothing dirty; served uncached from the backing device), "+
			"failed (the cache device failed holding dirty data: writes and reads of that data fail with EIO).", "state"),
		cause: d("health_cause", "1 while the cause applies, else 0: cache_failed (the cache device returned an I/O error and is no longer used), "+
			"backing_io_errors (the backing device returned I/O errors since the volume was opened), writeback_failing (writeback to the backing device fails and is retried), "+
			"log_full (the cache's log is nearly full: writes are paced to writeback's speed, or wait for it), "+
			"lost_flushed_segments (recovery found log segments recorded as durable blank or corrupt: the cache device lost flushed writes).", "cause"),
		lostSegments: d("lost_flushed_segments", "Log segments the checkpoint recorded as durable that recovery found blank or corrupt when the volume was opened (a cache device that ignores flushes)."),
		stranded:     d("stranded_dirty_bytes", "Bytes whose newest data was only on the cache device when it failed: reads of them fail with EIO until the cache is recovered."),
		paced:        d("paced_writes_total", "Writes slowed because the cache's log was nearly full (the backing device is the bottleneck)."),
		recovering: prometheus.NewDesc("writeboost_volume_recovering",
			"1 while a staged volume's cache is being reopened and its log replayed after a restart of the plugin; its I/O waits until then.", []string{"volume", "node"}, nil),
		wipePending: prometheus.NewDesc("writeboost_pool_wipe_pending_bytes",
			"Bytes of deleted volumes (or adopted free space) still being zeroed; they are not free for new volumes until wiped.", []string{"pool", "node"}, nil),
		wiped: prometheus.NewDesc("writeboost_pool_wiped_bytes_total",
			"Bytes zeroed and handed back to the pool by its wiper since the plugin started.", []string{"pool", "node"}, nil),
		memory:      d("memory_bytes", "Memory the volume's cache engine holds now, by part: index (fixed at open), buffers (RAM buffers on tmpfs, charged to the pod), scratch (writeback, held only while it runs).", "part"),
		memReserved: d("memory_reserved_bytes", "Worst-case memory reserved for the volume in the node's memory budget (index + buffers + scratch + NBD requests in flight)."),
		budgetBytes: prometheus.NewDesc("writeboost_memory_budget_bytes",
			"The node plugin's memory budget: staging is refused beyond it.", []string{"node"}, nil),
		budgetReserved: prometheus.NewDesc("writeboost_memory_budget_reserved_bytes",
			"Memory reserved by the staged volumes of the node, out of writeboost_memory_budget_bytes.", []string{"node"}, nil),
	}
}

// WithBudget adds the node's memory budget figures.
func (c *Collector) WithBudget(b BudgetSource) *Collector {
	c.budget = b
	return c
}

// WithRecovering adds the volumes whose recovery after a restart is
// running (they have no Status yet).
func (c *Collector) WithRecovering(r func() []string) *Collector {
	c.recoveringSrc = r
	return c
}

// WithPools adds the pools' wipe figures.
func (c *Collector) WithPools(p PoolSource) *Collector {
	c.pools = p
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.dirty, c.cacheSize, c.backingSize, c.readHit, c.writeHit, c.wbRate,
		c.wbLag, c.util, c.wbBytes, c.flushes, c.flushSeconds, c.ioErrors, c.cleanedBlocks, c.reclaimedSegments, c.cacheWA, c.wipePending, c.wiped, c.memory, c.memReserved, c.budgetBytes, c.budgetReserved,
		c.health, c.cause, c.lostSegments, c.stranded, c.paced, c.recovering} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	if c.pools != nil {
		for role, w := range c.pools() {
			ch <- prometheus.MustNewConstMetric(c.wipePending, prometheus.GaugeValue, float64(w.PendingBytes), role, c.node)
			ch <- prometheus.MustNewConstMetric(c.wiped, prometheus.CounterValue, float64(w.WipedBytes), role, c.node)
		}
	}
	if c.budget != nil {
		limit, vols := c.budget()
		var sum int64
		for vol, n := range vols {
			sum += n
			ch <- prometheus.MustNewConstMetric(c.memReserved, prometheus.GaugeValue, float64(n), vol, c.node)
		}
		ch <- prometheus.MustNewConstMetric(c.budgetBytes, prometheus.GaugeValue, float64(limit), c.node)
		ch <- prometheus.MustNewConstMetric(c.budgetReserved, prometheus.GaugeValue, float64(sum), c.node)
	}
	if c.recoveringSrc != nil {
		for _, vol := range c.recoveringSrc() {
			ch <- prometheus.MustNewConstMetric(c.recovering, prometheus.GaugeValue, 1, vol, c.node)
		}
	}
	for vol, s := range c.src() {
		g := func(d *prometheus.Desc, v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{vol, c.node}, extra...)...)
		}
		k := func(d *prometheus.Desc, v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, append([]string{vol, c.node}, extra...)...)
		}
		g(c.dirty, float64(s.NrDirtyCacheBlocks*blockSize))
		g(c.cacheSize, float64(s.CacheSize))
		g(c.backingSize, float64(s.BackingSize))
		g(c.readHit, s.ReadHitRatio)
		g(c.writeHit, s.WriteHitRatio)
		g(c.wbRate, s.WritebackBytesPerSec)
		lag := 0.0
		if s.CurrentID > s.LastWritebackID {
			lag = float64(s.CurrentID - s.LastWritebackID)
		}
		g(c.wbLag, lag)
		g(c.util, s.BackingUtilization)
		k(c.wbBytes, float64(s.WritebackBytes))
		k(c.flushes, float64(s.FlushCount))
		k(c.flushSeconds, s.FlushLatencySecondsSum)
		k(c.ioErrors, float64(s.CacheIOErrors), "cache")
		k(c.ioErrors, float64(s.BackingIOErrors), "backing")
		k(c.cleanedBlocks, float64(s.Cleaning.CleanedBlocks))
		k(c.reclaimedSegments, float64(s.Cleaning.CleanedSegments), "cleaning")
		k(c.reclaimedSegments, float64(s.Cleaning.WrittenBackSegments), "writeback")
		g(c.cacheWA, s.Cleaning.CacheWriteAmplification)
		g(c.memory, float64(s.Memory.Index), "index")
		g(c.memory, float64(s.Memory.Buffers), "buffers")
		g(c.memory, float64(s.Memory.Scratch), "scratch")
		if s.Health.State != "" { // a Status from an engine, not a test's zero value
			for _, st := range engine.HealthStates {
				g(c.health, b2f(s.Health.State == st), string(st))
			}
			for _, k := range engine.CauseKinds {
				g(c.cause, b2f(s.Health.Has(k)), string(k))
			}
		}
		g(c.lostSegments, float64(s.Health.LostFlushedSegments))
		g(c.stranded, float64(s.Health.StrandedBlocks*blockSize))
		k(c.paced, float64(s.PacedWrites))
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
