package attach

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// The relay keeps a fallback attachment alive across a server restart.
//
// nbdfuse (libnbd) never reconnects: when its server goes away it exits and
// the loop device above it fails every I/O. So instead of the server's
// socket, nbdfuse is given the relay as its server, in libnbd's command mode
// (nbdfuse MOUNT --command writeboost nbd-relay ...): the relay is
// nbdfuse's child, speaking NBD on its stdin/stdout, and lives exactly as
// long as nbdfuse, independent of the serving process. It forwards requests
// to the real server; when that connection breaks it redials (until the
// dead-connection timeout) and resends every request not yet answered, the
// way the kernel requeues I/O after NBD_CMD_RECONFIGURE.
//
// Resending is safe because nothing that was answered is resent, and the
// server promises (engine: RAM buffers in a shared mapping) that writes it
// acknowledged survive its SIGKILL; a resent WRITE rewrites the same bytes,
// and a resent FLUSH covers everything acknowledged before it by either
// server incarnation. Requests in flight together carry no ordering promise
// in NBD, so resending them in arrival order is as valid as the original.

// relayFlags is what the relay advertises to nbdfuse: the server's flags,
// minus what the relay does not carry. Structured replies are refused, so
// DF is meaningless; one downstream connection, so no multi-conn; no resize.
func relayFlags(upstream uint16) uint16 {
	return upstream &^ (nbdproto.FlagSendDF | nbdproto.FlagCanMultiConn | nbdproto.FlagSendResize)
}

type relayReq struct {
	seq    uint64
	handle uint64
	typ    uint16
	length uint32
	raw    []byte // header and payload, as received
}

// relay forwards one downstream NBD client to an upstream server.
type relay struct {
	down     io.ReadWriter
	dial     func(timeout time.Duration) (net.Conn, nbdproto.ExportInfo, error)
	deadConn time.Duration
	info     nbdproto.ExportInfo
	// ceiling, when above the export's size, is the size advertised to
	// nbdfuse instead: its file then never needs to change size when the
	// volume grows, and the loop device above it is bounded by its
	// sizelimit to the volume's size (fallback.go).
	ceiling uint64

	downMu sync.Mutex // serialises replies to downstream
	upW    sync.Mutex // serialises requests to upstream (held without mu)

	mu struct {
		sync.Mutex
		up       net.Conn
		gen      int // bumped on every (re)connect
		inflight map[uint64]*relayReq
		seq      uint64
	}
	broken chan int // generation that broke
}

// ServeRelay runs the relay on down (nbdfuse's end, e.g. stdin+stdout) for
// export on the unix socket until down closes or the server stays away
// longer than deadConn. A ceiling above the export's size is advertised
// downstream in its place (0: the export's size); the server may come
// back from a restart bigger (a grown volume) but never smaller.
func ServeRelay(ctx context.Context, down io.ReadWriter, socket, export string, deadConn time.Duration, ceiling uint64) error {
	if deadConn <= 0 {
		deadConn = 2 * time.Minute
	}
	r := &relay{
		down:     down,
		deadConn: deadConn,
		dial: func(timeout time.Duration) (net.Conn, nbdproto.ExportInfo, error) {
			c, info, err := dialExport(socket, export, timeout)
			if err == nil {
				setSocketBuffers(c)
			}
			return c, info, err
		},
		broken:  make(chan int, 1),
		ceiling: ceiling,
	}
	r.mu.inflight = map[uint64]*relayReq{}
	setSocketBuffers(down)
	up, info, err := r.dial(10 * time.Second)
	if err != nil {
		return err
	}
	r.info = info
	r.mu.up = up
	if err := r.serverHandshake(); err != nil {
		up.Close()
		return err
	}
	go r.readUpstream(up, 0)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	go func() { errc <- r.reconnector(ctx) }()
	go func() { errc <- r.readDownstream() }()
	err = <-errc
	r.mu.Lock()
	if r.mu.up != nil {
		r.mu.up.Close()
	}
	r.mu.Unlock()
	return err
}

// serverHandshake plays a fixed-newstyle server to nbdfuse: OPT_GO/OPT_INFO
// get the upstream export's size and flags; every other option is
// unsupported (so replies stay simple and the relay can parse them).
func (r *relay) serverHandshake() error {
	g := binary.BigEndian.AppendUint64(nil, nbdproto.MagicNBD)
	g = binary.BigEndian.AppendUint64(g, nbdproto.MagicOption)
	g = binary.BigEndian.AppendUint16(g, nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes)
	if _, err := r.down.Write(g); err != nil {
		return fmt.Errorf("relay: greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(r.down, cf[:]); err != nil {
		return fmt.Errorf("relay: client flags: %w", err)
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(r.down, h[:]); err != nil {
			return fmt.Errorf("relay: option: %w", err)
		}
		if binary.BigEndian.Uint64(h[:]) != nbdproto.MagicOption {
			return errors.New("relay: bad option magic")
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOptReply {
			return fmt.Errorf("relay: option of %d bytes", n)
		}
		if _, err := io.CopyN(io.Discard, r.down, int64(n)); err != nil {
			return fmt.Errorf("relay: option data: %w", err)
		}
		reply := func(typ uint32, body []byte) error {
			b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicOptReply)
			b = binary.BigEndian.AppendUint32(b, opt)
			b = binary.BigEndian.AppendUint32(b, typ)
			b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
			_, err := r.down.Write(append(b, body...))
			return err
		}
		switch opt {
		case nbdproto.OptGo, nbdproto.OptInfo:
			body := binary.BigEndian.AppendUint16(nil, nbdproto.InfoExport)
			body = binary.BigEndian.AppendUint64(body, max(r.info.Size, r.ceiling))
			body = binary.BigEndian.AppendUint16(body, relayFlags(r.info.Flags))
			if err := reply(nbdproto.RepInfo, body); err != nil {
				return err
			}
			if err := reply(nbdproto.RepAck, nil); err != nil {
				return err
			}
			if opt == nbdproto.OptGo {
				return nil
			}
		case nbdproto.OptExportName:
			// It has no error reply: a server that will not serve it can only
			// hang up. libnbd uses OPT_GO.
			return errors.New("relay: client sent NBD_OPT_EXPORT_NAME; only NBD_OPT_GO is supported")
		case nbdproto.OptAbort:
			_ = reply(nbdproto.RepAck, nil)
			return errors.New("relay: client aborted the handshake")
		default:
			if err := reply(nbdproto.RepErrUnsup, nil); err != nil {
				return err
			}
		}
	}
}

// readDownstream reads requests from nbdfuse and forwards them.
func (r *relay) readDownstream() error {
	for {
		var h [28]byte
		if _, err := io.ReadFull(r.down, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("relay: read request: %w", err)
		}
		if binary.BigEndian.Uint32(h[:]) != nbdproto.MagicRequest {
			return errors.New("relay: bad request magic")
		}
		q := &relayReq{
			typ:    binary.BigEndian.Uint16(h[6:]),
			handle: binary.BigEndian.Uint64(h[8:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		raw := h[:]
		if q.typ == nbdproto.CmdWrite {
			if q.length > nbdproto.MaxPayload {
				return fmt.Errorf("relay: write of %d bytes", q.length)
			}
			raw = make([]byte, 28+int(q.length))
			copy(raw, h[:])
			if _, err := io.ReadFull(r.down, raw[28:]); err != nil {
				return fmt.Errorf("relay: read write payload: %w", err)
			}
		} else {
			raw = append([]byte(nil), raw...)
		}
		if q.typ == nbdproto.CmdRead && q.length > nbdproto.MaxPayload {
			return fmt.Errorf("relay: read of %d bytes", q.length)
		}
		q.raw = raw
		if q.typ == nbdproto.CmdDisc {
			r.mu.Lock()
			up, gen := r.mu.up, r.mu.gen
			r.mu.Unlock()
			if up != nil {
				r.writeUp(up, gen, raw)
			}
			return nil
		}
		r.mu.Lock()
		r.mu.seq++
		q.seq = r.mu.seq
		r.mu.inflight[q.handle] = q
		up, gen := r.mu.up, r.mu.gen
		r.mu.Unlock()
		// With no connection the request waits in inflight for the
		// reconnector to send it.
		if up != nil {
			r.writeUp(up, gen, raw)
		}
	}
}

// writeUp sends one request on connection generation gen. r.mu is not held
// while writing: a server that stops reading until we read its replies must
// not block readUpstream.
func (r *relay) writeUp(up net.Conn, gen int, raw []byte) bool {
	r.upW.Lock()
	_, err := up.Write(raw)
	r.upW.Unlock()
	if err != nil {
		r.mu.Lock()
		if r.mu.gen == gen {
			r.breakLocked()
		}
		r.mu.Unlock()
		return false
	}
	return true
}

// breakLocked drops the upstream connection and wakes the reconnector.
func (r *relay) breakLocked() {
	if r.mu.up == nil {
		return
	}
	r.mu.up.Close()
	r.mu.up = nil
	select {
	case r.broken <- r.mu.gen:
	default:
	}
}

// readUpstream forwards replies of one upstream connection generation.
func (r *relay) readUpstream(up net.Conn, gen int) {
	fail := func(err error) {
		klog.InfoS("Relay lost the server; reconnecting", "err", err)
		r.mu.Lock()
		if r.mu.gen == gen {
			r.breakLocked()
		}
		r.mu.Unlock()
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(up, h[:]); err != nil {
			fail(err)
			return
		}
		if binary.BigEndian.Uint32(h[:]) != nbdproto.MagicReply {
			fail(fmt.Errorf("bad reply magic %#x", binary.BigEndian.Uint32(h[:])))
			return
		}
		handle := binary.BigEndian.Uint64(h[8:])
		r.mu.Lock()
		q := r.mu.inflight[handle]
		r.mu.Unlock()
		if q == nil {
			fail(fmt.Errorf("reply for unknown handle %#x", handle))
			return
		}
		rep := h[:]
		if q.typ == nbdproto.CmdRead && binary.BigEndian.Uint32(h[4:]) == 0 {
			// Read the whole payload before replying: a server dying
			// mid-payload must cost a resend, never a torn reply.
			rep = make([]byte, 16+int(q.length))
			copy(rep, h[:])
			if _, err := io.ReadFull(up, rep[16:]); err != nil {
				fail(err)
				return
			}
		}
		r.mu.Lock()
		if r.mu.gen != gen {
			r.mu.Unlock()
			return // a newer connection resends this request
		}
		delete(r.mu.inflight, handle)
		r.mu.Unlock()
		r.downMu.Lock()
		_, err := r.down.Write(rep)
		r.downMu.Unlock()
		if err != nil {
			return // downstream gone; readDownstream ends the relay
		}
	}
}

// reconnector redials after every break and resends what is unanswered.
func (r *relay) reconnector(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.broken:
		}
		deadline := time.Now().Add(r.deadConn)
		var up net.Conn
		for {
			// A server that accepts but never answers must not stretch
			// the wait past the deadline.
			t := min(10*time.Second, time.Until(deadline))
			if t < 10*time.Millisecond {
				t = 10 * time.Millisecond
			}
			c, info, err := r.dial(t)
			if err == nil && (info.Size < r.info.Size || relayFlags(info.Flags)&^relayFlags(r.info.Flags) != 0 ||
				relayFlags(r.info.Flags)&^relayFlags(info.Flags) != 0) {
				c.Close()
				return fmt.Errorf("relay: the server came back with size %d flags %#x, was %d %#x", info.Size, info.Flags, r.info.Size, r.info.Flags)
			}
			if err == nil {
				up = c
				r.info.Size = info.Size // grown, perhaps: the new floor
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("relay: server unreachable for %s: %w", r.deadConn, err)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(50 * time.Millisecond):
			}
		}
		r.mu.Lock()
		r.mu.gen++
		r.mu.up = up
		gen := r.mu.gen
		pending := make([]*relayReq, 0, len(r.mu.inflight))
		for _, q := range r.mu.inflight {
			pending = append(pending, q)
		}
		sort.Slice(pending, func(i, j int) bool { return pending[i].seq < pending[j].seq })
		r.mu.Unlock()
		go r.readUpstream(up, gen)
		for _, q := range pending {
			if !r.writeUp(up, gen, q.raw) {
				break
			}
		}
		klog.InfoS("Relay reconnected to the server", "resent", len(pending))
	}
}

// RelayStdio returns the downstream end for ServeRelay when run by nbdfuse
// in command mode: libnbd hands the child one end of a socketpair as both
// stdin and stdout. As a net.Conn it goes through Go's poller; read as a
// blocking *os.File, each large request costs several scheduler hand-offs
// (measured: 1 MiB writes at QD1 took ~8x longer). Pipes or terminals fall
// back to plain stdin/stdout.
func RelayStdio() io.ReadWriter {
	if c, err := net.FileConn(os.Stdin); err == nil {
		return c
	}
	return struct {
		io.Reader
		io.Writer
	}{os.Stdin, os.Stdout}
}

// relaySocketBuffer lets a whole large request sit in each socket, so the
// relay copies it with a few system calls instead of many small hand-offs
// between nbdfuse, the relay and the server (the kernel caps it at
// net.core.wmem_max / rmem_max).
const relaySocketBuffer = 4 << 20

func setSocketBuffers(c any) {
	type bufferSetter interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}
	if b, ok := c.(bufferSetter); ok {
		_ = b.SetReadBuffer(relaySocketBuffer)
		_ = b.SetWriteBuffer(relaySocketBuffer)
	}
}
