package engine

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// Open opens (recovering, or formatting when asked) the cache on
// opts.Cache for opts.Backing and starts its goroutines.
func Open(opts Options) (*Engine, error) {
	if opts.Cache == nil || opts.Backing == nil {
		return nil, errors.New("engine: cache and backing devices are required")
	}
	t := opts.Tunables
	if t == (Tunables{}) {
		t = DefaultTunables()
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	e := &Engine{
		cache:   opts.Cache,
		backing: &meteredDevice{Device: opts.Backing},
		name:    opts.Name,
		clock:   opts.Clock,
		boot:    bootID(),
		stopCh:  make(chan struct{}),
	}
	if e.clock == nil {
		e.clock = realClock{}
	}
	e.backing.clock = e.clock
	if opts.BackingDiscard {
		d, ok := opts.Backing.(blockdev.Discarder)
		if !ok {
			return nil, errors.New("engine: BackingDiscard asked, but the backing device cannot discard")
		}
		e.backingDiscard = d
	}
	e.cond.L = &e.mu.Mutex
	e.mu.tunables = t
	e.mu.discards = map[uint32]uint32{}
	e.mu.cells = map[uint64]struct{}{}

	if err := e.openSuperblock(opts); err != nil {
		return nil, err
	}
	nbuf := opts.RAMBuffers
	if nbuf <= 0 {
		nbuf = defaultBuffers(e.nseg)
	}
	if uint64(nbuf) >= e.nseg {
		return nil, fmt.Errorf("engine: %d RAM buffers need a ring of more than %d segments", nbuf, e.nseg)
	}
	if err := e.setupBuffers(opts, nbuf); err != nil {
		return nil, err
	}
	ctx := opts.Context
	if ctx == nil {
		ctx = context.Background()
	}
	if err := e.recover(ctx); err != nil {
		if e.ownMem {
			e.mem.Close()
		}
		return nil, err
	}
	if t.WriteAroundMode && e.owedLocked() {
		// Write-around writes go straight to the backing device; dirty
		// blocks left by an earlier mode must reach it first so that no
		// stale cached copy can shadow a write-around write.
		klog.InfoS("write-around mode: writing back dirty blocks first", "volume", e.name, "dirtyBlocks", e.mu.nrDirty)
		for e.owedLocked() {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("engine: open: %w", err)
			}
			if _, err := e.writebackOnce(32, true); err != nil {
				return nil, err
			}
		}
	}
	klog.InfoS("cache opened", "volume", e.name, "uuid", fmt.Sprintf("%x", e.uuid), "segments", e.nseg,
		"segmentSize", e.geo.SegmentSize, "dirtyBlocks", e.mu.nrDirty, "lastWritebackID", e.mu.wbDoneID,
		"currentID", e.mu.nextID-1, "epoch", e.epoch)
	if opts.stepping {
		e.step = &stepper{hdr: make([]byte, blockSize), tick: e.newTickState()}
		return e, nil
	}
	e.wg.Add(3)
	go e.flusher()
	go e.writebacker()
	go e.ticker()
	return e, nil
}

func (e *Engine) setupBuffers(opts Options, nbuf int) error {
	need := BufferBytes(e.geo.SegmentSize, nbuf)
	switch {
	case opts.Buffer != nil:
		if len(opts.Buffer.Bytes()) < need {
			return fmt.Errorf("engine: buffer memory holds %d bytes, %d buffers of this cache need %d", len(opts.Buffer.Bytes()), nbuf, need)
		}
		e.mem = opts.Buffer
	case opts.BufferPath != "":
		m, err := OpenBufferFile(opts.BufferPath, need)
		if err != nil {
			return err
		}
		e.mem, e.ownMem = m, true
	default:
		e.mem, e.ownMem = NewHeapBuffer(need), true
	}
	b := e.mem.Bytes()
	stride := ctrlSize + e.geo.SegmentSize
	e.mu.bufs = make([]*buffer, nbuf)
	for i := range e.mu.bufs {
		base := i * stride
		e.mu.bufs[i] = &buffer{ctrl: b[base : base+ctrlSize], seg: b[base+ctrlSize : base+stride]}
	}
	return nil
}

// Close writes everything back to the cache device, records a clean
// shutdown and stops the engine. Dirty blocks stay in the cache.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.mu.closed {
		e.mu.Unlock()
		return ErrClosed
	}
	if cur := e.mu.cur; cur != nil && cur.count > 0 {
		e.sealLocked()
	}
	e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
	e.mu.closed = true
	e.mu.stop = true
	e.cond.Broadcast()
	e.finishStepsLocked() // stepping mode: the flusher's last rounds
	e.mu.Unlock()
	close(e.stopCh)
	e.wg.Wait()

	e.mu.Lock()
	err := e.mu.err
	pass := e.mu.passThrough
	wb := e.mu.wbDoneID
	e.mu.Unlock()
	if err == nil {
		if err = e.syncWithCheckpoint(wb, true); err != nil {
			err = fmt.Errorf("%w: %v", ErrIO, err)
		}
	} else if pass {
		// Writes passed through since the cache failed are durable once
		// the backing device is flushed; the cache's failure is still
		// the error Close reports.
		err = errors.Join(err, e.flushPassThrough())
	}
	if e.ownMem {
		if cerr := e.mem.Close(); err == nil && cerr != nil {
			err = cerr
		}
	}
	klog.InfoS("cache closed", "volume", e.name, "clean", err == nil, "err", err)
	return err
}
