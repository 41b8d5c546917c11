package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// Reads and plain (non-FUA) writes up to inlineMaxLen, and flushes, run on
// the reader goroutine while the backend's average latency for that kind
// of request stays under inlineMaxCost (unless Config.NoInline).
const (
	inlineMaxLen  = 128 << 10
	inlineMaxCost = 20 * time.Microsecond
)

// reply is one completed request, to be sent.
type reply struct {
	handle uint64
	errno  uint32
	data   []byte  // READ payload, nil otherwise
	buf    *[]byte // pooled buffer holding data (or a WRITE payload) to recycle
	weight int64   // bytes charged to the connection's budget
}

// conn is one client connection. The reader (serve) parses requests,
// bounds what is in flight with the budget, and starts one goroutine per
// request; each request goroutine (do) calls the backend and sends its own
// reply (see send), so a slow request never holds up the others and
// replies go out in completion order. The exception is small reads and
// plain writes while the backend answers those fast: they run on the reader
// (see inlineMaxCost), which saves a goroutine start and wake-up per
// request (on 2 cores that doubles 4K read IOPS over a RAM disk); the price
// is that a request that turns out slow (a cache miss) holds up the
// requests behind it on this connection until it returns, after which
// requests go to goroutines again until the backend is fast again.
type conn struct {
	srv *Server
	nc  net.Conn
	br  *bufio.Reader
	bw  *bufio.Writer
	exp *exportState

	work   sync.WaitGroup
	budget budget

	ready       atomic.Int32 // replies waiting to be written
	readerBusy  atomic.Bool  // the reader has buffered requests to dispatch
	writeCost   atomic.Int64 // moving average of WriteAt latency, ns
	readCost    atomic.Int64 // moving average of ReadAt latency, ns
	flushCost   atomic.Int64 // moving average of Flush latency, ns
	unread      int          // payload bytes in br still to be consumed (reader only)
	wmu         sync.Mutex   // serialises replies on bw
	werr        error        // first write error, under wmu
	closedOnErr bool         // under wmu

	stopOnce sync.Once
	stopped  chan struct{} // closed by stopReading
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:     s,
		nc:      nc,
		br:      bufio.NewReaderSize(nc, 256<<10),
		bw:      bufio.NewWriterSize(nc, 256<<10),
		stopped: make(chan struct{}),
	}
	c.budget.init(s.cfg.MaxInFlightBytes, s.cfg.MaxInFlightRequests)
	// Assume a slow backend until writes have shown otherwise.
	c.writeCost.Store(int64(inlineMaxCost))
	c.readCost.Store(int64(inlineMaxCost))
	c.flushCost.Store(int64(inlineMaxCost))
	return c
}

// stopReading makes the reader stop at the next request boundary it reaches
// (or at once if it is blocked waiting for one).
func (c *conn) stopReading() {
	c.stopOnce.Do(func() {
		close(c.stopped)
		_ = c.nc.SetReadDeadline(time.Now())
	})
}

func (c *conn) isStopped() bool {
	select {
	case <-c.stopped:
		return true
	default:
		return false
	}
}

func (c *conn) serve() {
	defer c.nc.Close()
	remote := c.nc.RemoteAddr().String()
	_ = c.nc.SetDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout))
	exp, err := handshake(c.srv, c.br, c.bw)
	if err != nil {
		if errors.Is(err, errAbort) || errors.Is(err, io.EOF) {
			klog.V(4).InfoS("NBD client left during handshake", "remote", remote, "reason", err)
		} else {
			klog.InfoS("NBD handshake failed, closing connection", "remote", remote, "err", err)
		}
		return
	}
	if c.isStopped() {
		return
	}
	_ = c.nc.SetDeadline(time.Time{})
	if c.isStopped() { // Shutdown raced with the deadline reset
		_ = c.nc.SetReadDeadline(time.Now())
	}
	c.exp = exp
	klog.V(2).InfoS("NBD client connected", "remote", remote, "export", exp.Name, "flags", fmt.Sprintf("%#x", exp.flags))

	if err := c.readLoop(); err != nil {
		klog.InfoS("Closing NBD connection", "remote", remote, "export", exp.Name, "reason", err)
	}
	c.flushPending()
	// Finish what was read: every request gets its reply before the close.
	c.work.Wait()
	klog.V(2).InfoS("NBD client disconnected", "remote", remote, "export", exp.Name)
}

// readLoop reads requests until DISC, EOF, shutdown, or a protocol
// violation, which it returns as the reason to close.
func (c *conn) readLoop() error {
	var hdr [nbdproto.RequestHeaderSize]byte
	exp := c.exp
	for {
		if c.br.Buffered() < nbdproto.RequestHeaderSize {
			c.flushPending() // the next read may block
		} else {
			c.readerBusy.Store(true)
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			if c.isStopped() || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read request: %w", err)
		}
		req, err := nbdproto.ParseRequest(&hdr)
		if err != nil {
			return err
		}
		if req.Type == nbdproto.CmdDisc {
			return nil
		}
		var weight int64 = int64(req.Length)
		if req.Type != nbdproto.CmdRead && req.Type != nbdproto.CmdWrite {
			weight = 0 // no payload either way
		}
		if weight > int64(exp.maxLength) {
			if req.Type == nbdproto.CmdWrite {
				// We will not buffer it and cannot skip it cheaply.
				return fmt.Errorf("WRITE of %d bytes exceeds the %d byte limit", req.Length, exp.maxLength)
			}
			if !c.budget.tryAcquire(0) {
				c.flushPending()
				c.budget.acquire(0)
			}
			c.send(reply{handle: req.Handle, errno: nbdproto.ErrInval}, true)
			continue
		}
		if !c.budget.tryAcquire(weight) {
			c.flushPending()
			c.budget.acquire(weight)
		}
		if c.srv.closing.Load() {
			// Shutting down: a request read now is neither run nor
			// answered, and the connection closes once the requests
			// read before have their replies. The kernel's nbd driver
			// (after RECONFIGURE) and our relay (after it redials) send
			// an unanswered request again to the next server; an error
			// reply would reach the filesystem above as EIO (a graceful
			// plugin upgrade failed a writer's fsync with ESHUTDOWN).
			c.budget.release(weight)
			return nil
		}

		inline := !c.srv.cfg.NoInline && req.Length <= inlineMaxLen && ((req.Type == nbdproto.CmdWrite && req.Flags&nbdproto.CmdFlagFUA == 0 &&
			time.Duration(c.writeCost.Load()) < inlineMaxCost) ||
			(req.Type == nbdproto.CmdRead && time.Duration(c.readCost.Load()) < inlineMaxCost) ||
			// A flush that returns at once (a RAM disk, nothing
			// dirty) costs less here than a goroutine's wake-up, which
			// fsync-per-write clients pay on every write.
			(req.Type == nbdproto.CmdFlush && time.Duration(c.flushCost.Load()) < inlineMaxCost))
		if inline && req.Type == nbdproto.CmdWrite && c.br.Buffered() >= int(req.Length) && c.check(req) == 0 {
			// The payload is already in the read buffer: hand the
			// backend a view of it (WriteAt must not keep p), saving
			// a copy.
			p, _ := c.br.Peek(int(req.Length))
			c.work.Add(1)
			c.readerBusy.Store(false)
			c.unread = len(p)
			c.do(req, p, nil, weight, true)
			c.unread = 0
			_, _ = c.br.Discard(len(p))
			continue
		}

		var buf *[]byte
		if req.Type == nbdproto.CmdWrite {
			buf = getBuf(int(req.Length))
			if c.br.Buffered() < int(req.Length) {
				c.flushPending() // reading the payload may block
			}
			if _, err := io.ReadFull(c.br, (*buf)[:req.Length]); err != nil {
				putBuf(buf)
				c.budget.release(weight)
				return fmt.Errorf("read WRITE payload: %w", err)
			}
		}
		if errno := c.check(req); errno != 0 {
			c.send(reply{handle: req.Handle, errno: errno, buf: buf, weight: weight}, true)
			continue
		}
		var payload []byte
		if buf != nil {
			payload = (*buf)[:req.Length]
		}
		c.work.Add(1)
		if inline {
			// A small request to a backend that answers quickly (RAM,
			// a cache hit) costs less than starting a goroutine and
			// waking it: do it here. If the backend gets slow, requests
			// go back to their own goroutines, so the reader is held
			// up by at most one slow request at a time.
			// Replies finished by others meanwhile must not wait for
			// this one (it may turn out slow): they flush themselves.
			c.readerBusy.Store(false)
			c.do(req, payload, buf, weight, true)
		} else {
			go c.do(req, payload, buf, weight, false)
		}
	}
}

// check validates a request against the export before any backend call.
func (c *conn) check(req nbdproto.Request) uint32 {
	exp := c.exp
	switch req.Type {
	case nbdproto.CmdRead, nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes:
	case nbdproto.CmdFlush:
		return 0
	default: // CACHE, BLOCK_STATUS (never advertised) and unknown commands
		return nbdproto.ErrInval
	}
	write := req.Type != nbdproto.CmdRead
	if write && exp.ReadOnly {
		return nbdproto.ErrPerm
	}
	if (req.Type == nbdproto.CmdTrim && exp.trimmer == nil) || (req.Type == nbdproto.CmdWriteZeroes && exp.zeroer == nil) {
		return nbdproto.ErrInval
	}
	if size := exp.size(); req.Offset > size || uint64(req.Length) > size-req.Offset {
		// The spec: ENOSPC for writes beyond the end, EINVAL for reads and trims.
		if req.Type == nbdproto.CmdWrite || req.Type == nbdproto.CmdWriteZeroes {
			return nbdproto.ErrNoSpc
		}
		return nbdproto.ErrInval
	}
	return 0
}

// do runs one request against the backend and queues its reply.
// payload is a WRITE's data; buf, if not nil, holds it and is recycled
// after the reply.
func (c *conn) do(req nbdproto.Request, payload []byte, buf *[]byte, weight int64, onReader bool) {
	defer c.work.Done()
	exp := c.exp
	r := reply{handle: req.Handle, weight: weight, buf: buf}
	off := int64(req.Offset)
	n := int64(req.Length)
	fua := req.Flags&nbdproto.CmdFlagFUA != 0
	var err error
	switch req.Type {
	case nbdproto.CmdRead:
		r.buf = getBuf(int(n))
		p := (*r.buf)[:n]
		var got int
		start := time.Now()
		got, err = exp.Backend.ReadAt(p, off)
		cost := c.readCost.Load()
		c.readCost.Store(cost + (int64(time.Since(start))-cost)/8)
		if got == len(p) && errors.Is(err, io.EOF) {
			err = nil // io.EOF with a full buffer is success
		} else if err == nil && got != len(p) {
			err = io.ErrUnexpectedEOF
		}
		if err == nil {
			// Data in hand: only now may a success header be sent.
			r.data = p
		}
	case nbdproto.CmdWrite:
		p := payload
		if !fua {
			start := time.Now()
			var wrote int
			wrote, err = exp.Backend.WriteAt(p, off)
			if err == nil && wrote != len(p) {
				err = io.ErrShortWrite
			}
			// Moving average (1/8 weight) of plain write latency.
			cost := c.writeCost.Load()
			c.writeCost.Store(cost + (int64(time.Since(start))-cost)/8)
		} else if exp.fua != nil {
			err = exp.fua.WriteFUA(p, off)
		} else {
			_, err = exp.Backend.WriteAt(p, off)
			if err == nil && exp.flusher != nil {
				err = exp.flusher.Flush()
			}
		}
	case nbdproto.CmdFlush:
		// Every write replied to before this FLUSH was read had returned
		// from the backend, so a backend Flush now covers all of them.
		if exp.flusher != nil {
			start := time.Now()
			err = exp.flusher.Flush()
			cost := c.flushCost.Load()
			c.flushCost.Store(cost + (int64(time.Since(start))-cost)/8)
		} else {
			c.flushCost.Store(0)
		}
	case nbdproto.CmdTrim:
		err = exp.trimmer.Trim(off, n)
		if err == nil && fua && exp.flusher != nil {
			err = exp.flusher.Flush()
		}
	case nbdproto.CmdWriteZeroes:
		// NO_HOLE needs nothing: our zeros always read back as zeros and
		// allocation is advisory (see Zeroer).
		err = exp.zeroer.WriteZeroes(off, n)
		if err == nil && fua && exp.flusher != nil {
			err = exp.flusher.Flush()
		}
	}
	if err != nil {
		r.errno = Errno(err)
		r.data = nil
		klog.V(2).InfoS("NBD request failed", "export", exp.Name, "cmd", nbdproto.CmdName(req.Type), "offset", off, "length", n, "errno", r.errno, "err", err)
	}
	c.send(r, onReader)
}

// send writes one reply. Whoever completes a request writes its reply
// (no hand-off to a writer goroutine, which costs a wake-up per request);
// the last of a burst of concurrent senders flushes, so replies that
// complete together share one syscall and none waits behind a slow
// request. Every reply must have been charged to the budget; send releases
// it and recycles the buffer. After a write error the socket is closed so
// the reader stops; later replies are dropped.
func (c *conn) send(r reply, onReader bool) {
	c.ready.Add(1)
	c.wmu.Lock()
	if c.werr == nil {
		var hdr [nbdproto.ReplyHeaderSize]byte
		nbdproto.PutReply(hdr[:], r.errno, r.handle)
		if _, c.werr = c.bw.Write(hdr[:]); c.werr == nil && r.data != nil {
			_, c.werr = c.bw.Write(r.data)
		}
	}
	// While the reader is still dispatching requests it has already
	// buffered, more replies are coming: leave the flush to it (it flushes
	// before it can block, see flushPending).
	readerWillFlush := c.readerBusy.Load()
	if onReader {
		readerWillFlush = c.br.Buffered()-c.unread >= nbdproto.RequestHeaderSize
	}
	if c.ready.Add(-1) == 0 && c.werr == nil && !readerWillFlush {
		c.werr = c.bw.Flush()
	}
	c.checkWriteErrLocked()
	c.wmu.Unlock()
	if r.buf != nil {
		putBuf(r.buf)
	}
	c.budget.release(r.weight)
}

// checkWriteErrLocked closes the connection on the first write error.
func (c *conn) checkWriteErrLocked() {
	if c.werr != nil && !c.closedOnErr {
		c.closedOnErr = true
		// Closing does not block; the reader and senders then fail fast.
		c.fail(c.werr)
	}
}

// flushPending is called by the reader before it may block (waiting for
// the client or for budget): replies written while it was busy must go out.
func (c *conn) flushPending() {
	c.readerBusy.Store(false)
	c.wmu.Lock()
	if c.werr == nil && c.ready.Load() == 0 && c.bw.Buffered() > 0 {
		c.werr = c.bw.Flush()
		c.checkWriteErrLocked()
	}
	c.wmu.Unlock()
}

func (c *conn) fail(err error) {
	if !c.isStopped() {
		klog.InfoS("NBD reply write failed, closing connection", "remote", c.nc.RemoteAddr().String(), "err", err)
	}
	c.nc.Close()
}

// budget bounds the requests and payload bytes in flight on a connection.
// Only the reader acquires, so there is no fairness to worry about.
type budget struct {
	mu       sync.Mutex
	cond     sync.Cond
	bytes    int64
	count    int
	maxBytes int64
	maxCount int
}

func (b *budget) init(maxBytes int64, maxCount int) {
	b.cond.L = &b.mu
	b.maxBytes, b.maxCount = maxBytes, maxCount
}

func (b *budget) tryAcquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.count > 0 && (b.count >= b.maxCount || b.bytes+n > b.maxBytes) {
		return false
	}
	b.bytes += n
	b.count++
	return true
}

func (b *budget) acquire(n int64) {
	b.mu.Lock()
	for b.count > 0 && (b.count >= b.maxCount || b.bytes+n > b.maxBytes) {
		b.cond.Wait()
	}
	b.bytes += n
	b.count++
	b.mu.Unlock()
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.bytes -= n
	b.count--
	b.mu.Unlock()
	b.cond.Signal()
}

// Payload buffers come from per-size-class pools (powers of two from 4 KiB
// to MaxPayload) so a steady stream of requests allocates nothing.
const (
	minBufShift = 12
	maxBufShift = 25 // MaxPayload
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

func getBuf(n int) *[]byte {
	cl := bufClass(n)
	if v := bufPools[cl].Get(); v != nil {
		return v.(*[]byte)
	}
	b := make([]byte, 1<<(cl+minBufShift))
	return &b
}

func putBuf(b *[]byte) {
	cl := bufClass(cap(*b))
	if cl < len(bufPools) && cap(*b) == 1<<(cl+minBufShift) {
		*b = (*b)[:cap(*b)]
		bufPools[cl].Put(b)
	}
}
