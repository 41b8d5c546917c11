package main

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// The engine alone: writeboost's server-side time per request. The same
// engine `writeboost serve --direct` runs (default tunables, RAM buffers
// on /dev/shm, cache opened with O_DIRECT), on the same fresh devices as
// every system of the VM run, but called in-process, with no NBD between
// it and the writer. A job's client-observed time per request on writeboost
// (through kernel nbd) minus the engine's here is what the NBD path costs:
// the kernel driver, the socket, pkg/nbd and the scheduler's wake-ups.

// VMEngineAlone is one job of the engine alone.
type VMEngineAlone struct {
	Requests int     `json:"requests"`
	Seconds  float64 `json:"seconds"`
	IOPS     float64 `json:"iops"`
	// MeanUs and P99Us are per request (a write, or a write and its
	// flush for the fsync job), as each writer saw it.
	MeanUs float64 `json:"mean_us"`
	P99Us  float64 `json:"p99_us"`
	Error  string  `json:"error,omitempty"`
}

// engineAloneJobs are the jobs measured on the engine alone, with their
// writers (the queue depth) and whether each write is followed by a flush.
var engineAloneJobs = []struct {
	id      string
	writers int
	flush   bool
}{{"qd1", 1, false}, {"qd32", 32, false}, {"fsync", 1, true}}

// engineAlone opens a fresh engine on devs and runs job for runtime over
// region bytes of 4 KiB random writes.
func engineAlone(ctx context.Context, devs vmDevices, writers int, flush bool, region int64, runtime time.Duration) VMEngineAlone {
	var res VMEngineAlone
	fail := func(err error) VMEngineAlone { res.Error = err.Error(); return res }
	cache, err := blockdev.OpenFile(devs.Cache, blockdev.FileOptions{Direct: true})
	if err != nil {
		return fail(fmt.Errorf("open cache: %w", err))
	}
	defer cache.Close()
	backing, err := blockdev.OpenFile(devs.HDD, blockdev.FileOptions{Direct: true})
	if err != nil {
		return fail(fmt.Errorf("open backing: %w", err))
	}
	defer backing.Close()
	buf := "/dev/shm/benchvm-engine-alone.buf"
	os.Remove(buf)
	defer os.Remove(buf)
	e, err := engine.Open(engine.Options{Context: ctx, Cache: cache, Backing: backing, Format: true, Reformat: true,
		BufferPath: buf, Tunables: engine.DefaultTunables(), Name: "engine-alone"})
	if err != nil {
		return fail(fmt.Errorf("open engine: %w", err))
	}
	defer func() {
		if err := e.Close(); err != nil {
			klog.ErrorS(err, "close engine-alone")
		}
	}()
	blocks := region / blockSize
	deadline := time.Now().Add(runtime)
	lat := make([][]time.Duration, writers)
	errs := make([]error, writers)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w) + 1))
			p := make([]byte, blockSize)
			rng.Read(p)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t := time.Now()
				if _, err := e.WriteAt(p, rng.Int63n(blocks)*blockSize); err != nil {
					errs[w] = err
					return
				}
				if flush {
					if err := e.Flush(); err != nil {
						errs[w] = err
						return
					}
				}
				lat[w] = append(lat[w], time.Since(t))
			}
		}(w)
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	for _, err := range errs {
		if err != nil {
			return fail(err)
		}
	}
	all := slices.Concat(lat...)
	if len(all) == 0 {
		return fail(fmt.Errorf("no request completed"))
	}
	slices.Sort(all)
	var sum time.Duration
	for _, d := range all {
		sum += d
	}
	res.Requests = len(all)
	res.IOPS = float64(len(all)) / res.Seconds
	res.MeanUs = float64(sum.Microseconds()) / float64(len(all))
	res.P99Us = float64(all[len(all)*99/100].Microseconds())
	return res
}

// vmEngineAlone runs every engine-alone job, each on fresh devices.
func vmEngineAlone(ctx context.Context, v *vmEnv, o vmOpts) map[string]VMEngineAlone {
	out := map[string]VMEngineAlone{}
	region := int64(0.5*float64(o.cache)) &^ (1<<20 - 1)
	for _, j := range engineAloneJobs {
		devs, release, err := freshDevices(ctx, v, o)
		if err != nil {
			out[j.id] = VMEngineAlone{Error: err.Error()}
			continue
		}
		r := engineAlone(ctx, devs, j.writers, j.flush, region, o.short)
		release()
		klog.InfoS("engine alone", "job", j.id, "iops", int(r.IOPS), "meanUs", r.MeanUs, "p99Us", r.P99Us, "error", r.Error)
		out[j.id] = r
		if ctx.Err() != nil {
			break
		}
	}
	return out
}
