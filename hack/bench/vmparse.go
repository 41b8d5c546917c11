package main

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// This file parses what the kernel's caches and fio report inside the VM
// (make bench-vm): dmsetup status lines, bcache's sysfs sizes, fio's
// per-second IOPS logs, and /proc CPU counters.

// dmStatus splits one `dmsetup status NAME` line ("<start> <length>
// <target> <fields...>") and checks the target type.
func dmStatus(line, target string) ([]string, error) {
	f := strings.Fields(line)
	if len(f) < 3 {
		return nil, fmt.Errorf("dmsetup status %q: too few fields", line)
	}
	if f[2] != target {
		return nil, fmt.Errorf("dmsetup status %q: target %q, want %q", line, f[2], target)
	}
	return f[3:], nil
}

func dmUint(fields []string, i int, what, line string) (uint64, error) {
	if i >= len(fields) {
		return 0, fmt.Errorf("dmsetup status %q: no %s (field %d)", line, what, i+4)
	}
	v, err := strconv.ParseUint(fields[i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("dmsetup status %q: %s: %w", line, what, err)
	}
	return v, nil
}

// WriteboostStatus is the part of dm-writeboost's status line the benchmark
// uses: cursor, nr_cache_blocks, nr_segments, current_id, last_flushed_id,
// last_writeback_id, nr_dirty_cache_blocks, then counters and tunables.
type WriteboostStatus struct {
	NrCacheBlocks   uint64
	NrSegments      uint64
	CurrentID       uint64
	LastFlushedID   uint64
	LastWritebackID uint64
	NrDirty         uint64
}

func parseWriteboostStatus(line string) (WriteboostStatus, error) {
	f, err := dmStatus(line, "writeboost")
	if err != nil {
		return WriteboostStatus{}, err
	}
	var s WriteboostStatus
	for _, x := range []struct {
		p    *uint64
		i    int
		what string
	}{{&s.NrCacheBlocks, 1, "nr_cache_blocks"}, {&s.NrSegments, 2, "nr_segments"}, {&s.CurrentID, 3, "current_id"},
		{&s.LastFlushedID, 4, "last_flushed_id"}, {&s.LastWritebackID, 5, "last_writeback_id"}, {&s.NrDirty, 6, "nr_dirty_cache_blocks"}} {
		if *x.p, err = dmUint(f, x.i, x.what, line); err != nil {
			return WriteboostStatus{}, err
		}
	}
	return s, nil
}

// WritecacheStatus is dm-writecache's status: error indicator, total
// blocks, free blocks, blocks under writeback (then statistics, which are
// not needed). Used blocks are dirty or being written back: written-back
// blocks return to the free list.
type WritecacheStatus struct {
	Error, Total, Free, Writeback uint64
}

// Used is the number of blocks holding data not yet on the origin.
func (s WritecacheStatus) Used() uint64 { return s.Total - min(s.Free, s.Total) }

func parseWritecacheStatus(line string) (WritecacheStatus, error) {
	f, err := dmStatus(line, "writecache")
	if err != nil {
		return WritecacheStatus{}, err
	}
	var s WritecacheStatus
	for i, p := range []*uint64{&s.Error, &s.Total, &s.Free, &s.Writeback} {
		if *p, err = dmUint(f, i, []string{"error", "total blocks", "free blocks", "writeback blocks"}[i], line); err != nil {
			return WritecacheStatus{}, err
		}
	}
	return s, nil
}

// parseBcacheSize reads a size as bcache's sysfs prints it (dirty_data):
// bch_hprint's "0", "512", "12.5k", "3.1M", "1.0G", powers of 1024.
func parseBcacheSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("bcache size: empty")
	}
	mult := 1.0
	switch s[len(s)-1] {
	case 'k', 'K':
		mult = 1 << 10
	case 'M':
		mult = 1 << 20
	case 'G':
		mult = 1 << 30
	case 'T':
		mult = 1 << 40
	case 'P':
		mult = 1 << 50
	}
	num := s
	if mult != 1 {
		num = s[:len(s)-1]
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("bcache size %q: not a size", s)
	}
	return int64(v * mult), nil
}

// parseFioIOPSLog turns fio's --write_iops_log output (with
// --log_avg_msec=1000: "msec, value, direction, block size, offset[,
// priority]" per line, one line per direction per interval) into the IOPS
// of every whole second, reads and writes summed. Second i covers
// (i*1000, (i+1)*1000] ms of the job.
func parseFioIOPSLog(data string) ([]float64, error) {
	sums := map[int64]float64{}
	var last int64 = -1
	for n, line := range strings.Split(data, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		f := strings.Split(line, ",")
		if len(f) < 3 {
			return nil, fmt.Errorf("fio iops log line %d %q: want at least 3 fields", n+1, line)
		}
		ms, err := strconv.ParseInt(strings.TrimSpace(f[0]), 10, 64)
		if err != nil || ms < 0 {
			return nil, fmt.Errorf("fio iops log line %d: time %q", n+1, f[0])
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(f[1]), 64)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("fio iops log line %d: value %q", n+1, f[1])
		}
		sec := (ms - 1) / 1000
		if ms == 0 {
			sec = 0
		}
		sums[sec] += v
		last = max(last, sec)
	}
	out := make([]float64, last+1)
	keys := make([]int64, 0, len(sums))
	for k := range sums {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	for _, k := range keys {
		out[k] = sums[k]
	}
	return out, nil
}

// CPUTimes is the aggregate "cpu" line of /proc/stat, in clock ticks.
type CPUTimes struct {
	User, Nice, System, Idle, IOWait, IRQ, SoftIRQ, Steal uint64
}

// Busy is every tick not idle or waiting for I/O.
func (c CPUTimes) Busy() uint64 {
	return c.User + c.Nice + c.System + c.IRQ + c.SoftIRQ + c.Steal
}

// Total is every tick.
func (c CPUTimes) Total() uint64 { return c.Busy() + c.Idle + c.IOWait }

func parseProcStat(data string) (CPUTimes, error) {
	for _, line := range strings.Split(data, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "cpu" {
			continue
		}
		if len(f) < 9 {
			return CPUTimes{}, fmt.Errorf("/proc/stat cpu line %q: too few fields", line)
		}
		var c CPUTimes
		for i, p := range []*uint64{&c.User, &c.Nice, &c.System, &c.Idle, &c.IOWait, &c.IRQ, &c.SoftIRQ, &c.Steal} {
			v, err := strconv.ParseUint(f[i+1], 10, 64)
			if err != nil {
				return CPUTimes{}, fmt.Errorf("/proc/stat cpu line: %w", err)
			}
			*p = v
		}
		return c, nil
	}
	return CPUTimes{}, fmt.Errorf("/proc/stat: no aggregate cpu line")
}

// parseProcPidStat returns utime and stime (clock ticks) from
// /proc/PID/stat. The command name, in parentheses, may hold spaces and
// parentheses itself, so fields are counted from the last ')'.
func parseProcPidStat(data string) (utime, stime uint64, err error) {
	i := strings.LastIndexByte(data, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/PID/stat %q: no command name", data)
	}
	f := strings.Fields(data[i+1:])
	// After the name: state(3) ppid ... utime is field 14, stime 15 of
	// the whole line, so 11 and 12 after it (0-based from state).
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/PID/stat: too few fields")
	}
	if utime, err = strconv.ParseUint(f[11], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("/proc/PID/stat utime: %w", err)
	}
	if stime, err = strconv.ParseUint(f[12], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("/proc/PID/stat stime: %w", err)
	}
	return utime, stime, nil
}
