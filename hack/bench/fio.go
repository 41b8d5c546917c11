package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"time"
)

// Workload is one fio job shape, run against every system.
type Workload struct {
	ID    string // short key used in results.json and charts
	Title string
	Args  []string // fio arguments besides the target, runtime and output
	// Metric is what the table compares: "iops" or "bw" (bytes/s).
	Metric string
}

// workloads are the five shapes of the issue. The 4K write + fsync job runs
// at QD1: a database waits for each fsync before its next commit.
var workloads = []Workload{
	{ID: "randwrite4k", Title: "4K random write QD32", Metric: "iops",
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=32"}},
	{ID: "randread4k", Title: "4K random read QD32 (warm)", Metric: "iops",
		Args: []string{"--rw=randread", "--bs=4k", "--iodepth=32"}},
	{ID: "seqwrite1m", Title: "1 MiB sequential write QD4", Metric: "bw",
		Args: []string{"--rw=write", "--bs=1m", "--iodepth=4"}},
	{ID: "fsync4k", Title: "4K random write + fsync each, QD1", Metric: "iops",
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"}},
	{ID: "randrw4k", Title: "4K random 70/30 read/write QD32", Metric: "iops",
		Args: []string{"--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=32"}},
}

// FioResult is what one fio run measured.
type FioResult struct {
	ReadIOPS    float64 `json:"read_iops"`
	WriteIOPS   float64 `json:"write_iops"`
	ReadBW      float64 `json:"read_bytes_per_sec"`
	WriteBW     float64 `json:"write_bytes_per_sec"`
	ReadP99Ms   float64 `json:"read_p99_ms"`
	WriteP99Ms  float64 `json:"write_p99_ms"`
	SyncP99Ms   float64 `json:"sync_p99_ms,omitempty"`
	RuntimeSec  float64 `json:"runtime_sec"`
	Error       string  `json:"error,omitempty"`
	CommandLine string  `json:"command"`
	// Engine is writeboost's state after the job, for (d) and (h): how
	// full the log ring was and how many writes were paced, which
	// explain the later workloads' figures.
	Engine *EngineSnapshot `json:"engine,omitempty"`
}

// EngineSnapshot is part of `writeboost status --json`.
type EngineSnapshot struct {
	NrSegments            uint64         `json:"nr_segments"`
	CurrentID             uint64         `json:"current_id"`
	LastWritebackID       uint64         `json:"last_writeback_id"`
	NrDirtyCacheBlocks    uint64         `json:"nr_dirty_cache_blocks"`
	PacedWrites           uint64         `json:"paced_writes"`
	WritebackBytes        uint64         `json:"writeback_bytes"`
	WritebackFilledBlocks uint64         `json:"writeback_filled_blocks"`
	Cleaning              EngineCleaning `json:"cleaning,omitzero"`
	Stat                  struct {
		ReadHitBufferFull  uint64 `json:"read_hit_buffer_full"`
		ReadHitCacheFull   uint64 `json:"read_hit_cache_full"`
		ReadMissBufferFull uint64 `json:"read_miss_buffer_full"`
		ReadMissCacheFull  uint64 `json:"read_miss_cache_full"`
	} `json:"stat"`
}

// EngineCleaning is the cleaner's part of the status (engine.CleaningStatus).
type EngineCleaning struct {
	CleanedBlocks           uint64  `json:"cleaned_blocks"`
	CleanedSegments         uint64  `json:"cleaned_segments"`
	WrittenBackSegments     uint64  `json:"written_back_segments"`
	WritebackYields         uint64  `json:"writeback_yields"`
	LogBlocks               uint64  `json:"log_blocks"`
	CacheWriteAmplification float64 `json:"cache_write_amplification"`
}

// fullReads returns the whole-block reads served from the cache (RAM
// buffers or cache device) and from the backing device so far.
func (s *EngineSnapshot) fullReads() (hits, misses uint64) {
	return s.Stat.ReadHitBufferFull + s.Stat.ReadHitCacheFull, s.Stat.ReadMissBufferFull + s.Stat.ReadMissCacheFull
}

// RingUsed is the fraction of the log ring holding segments not yet
// written back.
func (s *EngineSnapshot) RingUsed() float64 {
	if s == nil || s.NrSegments == 0 {
		return 0
	}
	return float64(s.CurrentID-s.LastWritebackID) / float64(s.NrSegments)
}

// IOPS is read+write operations per second.
func (r FioResult) IOPS() float64 { return r.ReadIOPS + r.WriteIOPS }

// BW is read+write bytes per second.
func (r FioResult) BW() float64 { return r.ReadBW + r.WriteBW }

// P99Ms is the worse of the read and write p99 completion latencies.
func (r FioResult) P99Ms() float64 { return max(r.ReadP99Ms, r.WriteP99Ms) }

// Value returns the figure the workload compares.
func (r FioResult) Value(metric string) float64 {
	if metric == "bw" {
		return r.BW()
	}
	return r.IOPS()
}

type fioDir struct {
	IOPS   float64 `json:"iops"`
	BW     float64 `json:"bw_bytes"`
	ClatNs struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
	LatNs struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"lat_ns"`
}

type fioJSON struct {
	Jobs []struct {
		Error   int     `json:"error"`
		Read    fioDir  `json:"read"`
		Write   fioDir  `json:"write"`
		Sync    fioDir  `json:"sync"`
		Runtime float64 `json:"job_runtime"`
	} `json:"jobs"`
}

func p99(d fioDir) float64 {
	for _, m := range []map[string]float64{d.ClatNs.Percentile, d.LatNs.Percentile} {
		if v, ok := m["99.000000"]; ok {
			return v / 1e6
		}
	}
	return 0
}

// runFio runs one fio job with the nbd engine against uri and parses its
// JSON output. A job that fails (a server without FLUSH refusing fsync, for
// instance) is reported in Error, not as a Go error, so the run goes on.
func runFio(ctx context.Context, uri string, size int64, runtime, ramp time.Duration, extra []string) FioResult {
	args := []string{
		"--name=bench", "--ioengine=nbd", "--uri=" + uri,
		"--size=" + strconv.FormatInt(size, 10),
		"--output-format=json", "--group_reporting=1",
		"--randrepeat=0", "--norandommap=1",
	}
	if runtime > 0 {
		args = append(args, "--time_based=1",
			fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())),
			fmt.Sprintf("--ramp_time=%ds", int(ramp.Seconds())))
	}
	args = append(args, extra...)
	// A stuck server must not stall the whole run: allow twice the job.
	return execFio(ctx, args, 2*(runtime+ramp)+90*time.Second)
}

// execFio runs fio with args (which must ask for JSON output) and parses
// what it printed, within limit.
func execFio(ctx context.Context, args []string, limit time.Duration) FioResult {
	res := FioResult{CommandLine: "fio " + joinArgs(args)}
	cctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	cmd := exec.CommandContext(cctx, "fio", args...)
	out, err := cmd.Output()
	if err != nil {
		msg := err.Error()
		if ee, ok := err.(*exec.ExitError); ok && len(ee.Stderr) > 0 {
			msg += ": " + lastLine(string(ee.Stderr))
		}
		res.Error = msg
		// fio still prints JSON for a job that errored; use what it has.
	}
	var j fioJSON
	if jerr := json.Unmarshal(jsonPart(out), &j); jerr != nil || len(j.Jobs) == 0 {
		if res.Error == "" {
			res.Error = fmt.Sprintf("parse fio output: %v", jerr)
		}
		return res
	}
	job := j.Jobs[0]
	if job.Error != 0 && res.Error == "" {
		res.Error = fmt.Sprintf("fio job error %d", job.Error)
	}
	res.ReadIOPS, res.WriteIOPS = job.Read.IOPS, job.Write.IOPS
	res.ReadBW, res.WriteBW = job.Read.BW, job.Write.BW
	res.ReadP99Ms, res.WriteP99Ms, res.SyncP99Ms = p99(job.Read), p99(job.Write), p99(job.Sync)
	res.RuntimeSec = job.Runtime / 1000
	return res
}

// jsonPart skips anything fio printed before its JSON document (warnings).
func jsonPart(b []byte) []byte {
	for i, c := range b {
		if c == '{' {
			return b[i:]
		}
	}
	return b
}

func lastLine(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == ' ') {
		s = s[:len(s)-1]
	}
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			return s[i+1:]
		}
	}
	return s
}

func joinArgs(a []string) string {
	s := ""
	for i, x := range a {
		if i > 0 {
			s += " "
		}
		s += x
	}
	return s
}
