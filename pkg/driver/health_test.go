package driver

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/metrics"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// nbdClient sends requests over the connection the sweep's attacher holds
// (the "kernel"), one at a time, with simple replies.
type nbdClient struct {
	t      *testing.T
	c      net.Conn
	handle uint64
}

// do sends one request and returns the reply's error (0 = success) and,
// for a read, the data.
func (n *nbdClient) do(cmd uint16, off int64, length int, payload []byte) (uint32, []byte) {
	n.t.Helper()
	n.handle++
	hdr := make([]byte, nbdproto.RequestHeaderSize)
	binary.BigEndian.PutUint32(hdr[0:], nbdproto.MagicRequest)
	binary.BigEndian.PutUint16(hdr[6:], cmd)
	binary.BigEndian.PutUint64(hdr[8:], n.handle)
	binary.BigEndian.PutUint64(hdr[16:], uint64(off))
	binary.BigEndian.PutUint32(hdr[24:], uint32(length))
	n.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := n.c.Write(append(hdr, payload...)); err != nil {
		n.t.Fatalf("nbd request: %v", err)
	}
	rep := make([]byte, nbdproto.ReplyHeaderSize)
	if _, err := io.ReadFull(n.c, rep); err != nil {
		n.t.Fatalf("nbd reply: %v", err)
	}
	if binary.BigEndian.Uint32(rep) != nbdproto.MagicReply || binary.BigEndian.Uint64(rep[8:]) != n.handle {
		n.t.Fatalf("nbd reply header %x", rep)
	}
	errno := binary.BigEndian.Uint32(rep[4:])
	var data []byte
	if cmd == nbdproto.CmdRead && errno == 0 {
		data = make([]byte, length)
		if _, err := io.ReadFull(n.c, data); err != nil {
			n.t.Fatalf("nbd read data: %v", err)
		}
	}
	return errno, data
}

// liveVolume creates, stages and publishes a volume on real engines over
// in-memory devices (the retry sweep's environment) with background
// writeback off, and returns an NBD client on its device.
func liveVolume(t *testing.T) (*sweepEnv, *nbdClient) {
	e := newSweepEnv(t)
	ctx := context.Background()
	e.createStaged(t, "pvc-h", sweepSize, map[string]string{"writebackThreshold": "0"})
	if err := e.publish(ctx); err != nil {
		t.Fatal(err)
	}
	e.att.mu.Lock()
	c := e.att.conns[e.att.devs[e.id]]
	e.att.mu.Unlock()
	if c == nil {
		t.Fatal("no NBD connection for the volume")
	}
	return e, &nbdClient{t: t, c: c}
}

func (e *sweepEnv) condition() *csi.VolumeCondition {
	e.t.Helper()
	r, err := NodeServer{d: e.d}.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: e.id, VolumePath: e.target})
	if err != nil {
		e.t.Fatal(err)
	}
	return r.VolumeCondition
}

func (e *sweepEnv) killCache() {
	e.mu.Lock()
	p := e.devs[e.id]
	e.mu.Unlock()
	p.cacheF.FailReadsAfter(0, syscall.EIO)
	p.cacheF.FailWritesAfter(0, syscall.EIO)
	p.cacheF.FailFlushesAfter(0, syscall.EIO)
}

// healthMetric returns the volume's writeboost_health_state{state} and
// writeboost_health_cause{cause} as the plugin's collector exports them.
func (e *sweepEnv) healthMetric(state engine.HealthState, cause engine.CauseKind) (st, ca float64) {
	e.t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(metrics.NewCollector("n1", e.d.statuses))
	mfs, err := reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	st, ca = -1, -1
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["volume"] != e.id {
				continue
			}
			switch {
			case mf.GetName() == "writeboost_health_state" && labels["state"] == string(state):
				st = m.GetGauge().GetValue()
			case mf.GetName() == "writeboost_health_cause" && labels["cause"] == string(cause):
				ca = m.GetGauge().GetValue()
			}
		}
	}
	return st, ca
}

// TestDeadCacheEndToEnd: a staged, published volume on real engines whose
// cache device dies, through the plugin: with nothing dirty (drained) its
// reads go on from the backing device and NodeGetVolumeStats and the
// metrics say it runs uncached; with dirty data, a read of it fails with
// EIO over NBD, never the stale backing copy, and the condition and
// metrics say the cache failed holding data not yet written back.
func TestDeadCacheEndToEnd(t *testing.T) {
	data := bytes.Repeat([]byte{0x5a}, 4096)
	t.Run("clean", func(t *testing.T) {
		e, nbd := liveVolume(t)
		if c := e.condition(); c.Abnormal {
			t.Fatalf("healthy volume: %v", c)
		}
		if errno, _ := nbd.do(nbdproto.CmdWrite, 0, len(data), data); errno != 0 {
			t.Fatalf("write: errno %d", errno)
		}
		if errno, _ := nbd.do(nbdproto.CmdFlush, 0, 0, nil); errno != 0 {
			t.Fatalf("flush: errno %d", errno)
		}
		if err := e.d.opts.Runtime.Drain(context.Background(), e.id); err != nil {
			t.Fatal(err)
		}
		e.killCache()
		errno, got := nbd.do(nbdproto.CmdRead, 0, len(data), nil)
		if errno != 0 || !bytes.Equal(got, data) {
			t.Fatalf("read after the cache died with nothing dirty: errno %d", errno)
		}
		if errno, _ := nbd.do(nbdproto.CmdWrite, 8192, len(data), data); errno != 0 {
			t.Fatalf("pass-through write: errno %d", errno)
		}
		if errno, _ := nbd.do(nbdproto.CmdFlush, 0, 0, nil); errno != 0 {
			t.Fatalf("pass-through flush: errno %d", errno)
		}
		c := e.condition()
		if !c.Abnormal || !strings.Contains(c.Message, "pass-through") || !strings.Contains(c.Message, "nothing dirty") {
			t.Fatalf("condition after the cache died with nothing dirty: %v", c)
		}
		if st, ca := e.healthMetric(engine.HealthPassThrough, engine.CauseCacheFailed); st != 1 || ca != 1 {
			t.Fatalf("metrics: health_state{pass-through} %v, health_cause{cache_failed} %v", st, ca)
		}
	})
	t.Run("dirty", func(t *testing.T) {
		e, nbd := liveVolume(t)
		if errno, _ := nbd.do(nbdproto.CmdWrite, 0, len(data), data); errno != 0 {
			t.Fatalf("write: errno %d", errno)
		}
		if errno, _ := nbd.do(nbdproto.CmdFlush, 0, 0, nil); errno != 0 {
			t.Fatalf("flush: errno %d", errno)
		}
		e.killCache()
		// The engine learns of the failure at its next use of the cache
		// device: the flush of a write still in a RAM buffer.
		if errno, _ := nbd.do(nbdproto.CmdWrite, 4096, len(data), data); errno != 0 {
			t.Fatalf("write into a RAM buffer: errno %d", errno)
		}
		if errno, _ := nbd.do(nbdproto.CmdFlush, 0, 0, nil); errno != uint32(syscall.EIO) {
			t.Fatalf("flush on a dead cache: errno %d, want EIO", errno)
		}
		if errno, got := nbd.do(nbdproto.CmdRead, 0, len(data), nil); errno != uint32(syscall.EIO) {
			t.Fatalf("read of a dirty block after the cache died: errno %d, data %x..., want EIO", errno, got[:min(8, len(got))])
		}
		if errno, _ := nbd.do(nbdproto.CmdWrite, 8192, len(data), data); errno != uint32(syscall.EIO) {
			t.Fatalf("write after the cache died with dirty data: errno %d, want EIO", errno)
		}
		// A block never written reads from the backing device.
		if errno, got := nbd.do(nbdproto.CmdRead, 1<<20, 4096, nil); errno != 0 || !bytes.Equal(got, make([]byte, 4096)) {
			t.Fatalf("read of a clean block after the cache died: errno %d", errno)
		}
		c := e.condition()
		if !c.Abnormal || !strings.Contains(c.Message, "not yet written back") || !strings.Contains(c.Message, "2 dirty blocks") {
			t.Fatalf("condition after the cache died with dirty data: %v", c)
		}
		if st, ca := e.healthMetric(engine.HealthFailed, engine.CauseCacheFailed); st != 1 || ca != 1 {
			t.Fatalf("metrics: health_state{failed} %v, health_cause{cache_failed} %v", st, ca)
		}
	})
}
