package attach

import (
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

func TestKernelServerFlags(t *testing.T) {
	adv := nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagCanMultiConn
	got, err := kernelServerFlags(adv, false)
	if err != nil || got != uint64(adv) {
		t.Fatalf("flags = %#x, %v; want exactly the advertised %#x", got, err, adv)
	}
	// Nothing the server did not promise, except READ_ONLY on request.
	got, err = kernelServerFlags(nbdproto.FlagHasFlags|nbdproto.FlagSendFlush, true)
	if err != nil || got != uint64(nbdproto.FlagHasFlags|nbdproto.FlagSendFlush|nbdproto.FlagReadOnly) {
		t.Fatalf("read-only flags = %#x, %v", got, err)
	}
	if _, err := kernelServerFlags(nbdproto.FlagSendFlush, false); err == nil {
		t.Fatal("flags without HAS_FLAGS accepted")
	}
	if m := missingFeatures(nbdproto.FlagHasFlags | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim); len(m) != 1 {
		t.Fatalf("missing = %v; want only flush", m)
	}
}

func TestConnectionCount(t *testing.T) {
	for _, c := range []struct {
		flags           uint16
		requested, ncpu int
		want            int
	}{
		{nbdproto.FlagHasFlags, 8, 8, 1}, // no CAN_MULTI_CONN: the kernel would refuse more
		{nbdproto.FlagHasFlags | nbdproto.FlagCanMultiConn, 0, 2, 2},
		{nbdproto.FlagHasFlags | nbdproto.FlagCanMultiConn, 0, 64, 4},
		{nbdproto.FlagHasFlags | nbdproto.FlagCanMultiConn, 3, 64, 3},
		{nbdproto.FlagHasFlags | nbdproto.FlagCanMultiConn, 1000, 2, maxConnections},
		{nbdproto.FlagHasFlags | nbdproto.FlagCanMultiConn, 0, 0, 1},
	} {
		if got := connectionCount(c.flags, c.requested, c.ncpu); got != c.want {
			t.Errorf("connectionCount(%#x, %d, %d) = %d; want %d", c.flags, c.requested, c.ncpu, got, c.want)
		}
	}
}

func TestChooseBlockSize(t *testing.T) {
	for _, c := range []struct {
		info nbdproto.ExportInfo
		want uint64
	}{
		{nbdproto.ExportInfo{Size: 1 << 30}, 4096},
		{nbdproto.ExportInfo{Size: 1 << 30, MinBlock: 512, PrefBlock: 4096, MaxBlock: 32 << 20}, 4096},
		{nbdproto.ExportInfo{Size: 1<<30 + 512}, 512},             // size not a 4K multiple
		{nbdproto.ExportInfo{Size: 1 << 30, MinBlock: 8192}, 512}, // odd server; let the kernel's checks speak
		{nbdproto.ExportInfo{Size: 1 << 30, MaxBlock: 1024}, 512},
	} {
		if got := chooseBlockSize(c.info); got != c.want {
			t.Errorf("chooseBlockSize(%+v) = %d; want %d", c.info, got, c.want)
		}
	}
}

func TestIoctlNumbers(t *testing.T) {
	// _IO(0xab, nr) = (0xab << 8) | nr, include/uapi/linux/nbd.h.
	io := func(nr uintptr) uintptr { return 0xab<<8 | nr }
	for name, c := range map[string][2]uintptr{
		"NBD_SET_SOCK":        {nbdSetSock, io(0)},
		"NBD_SET_BLKSIZE":     {nbdSetBlksize, io(1)},
		"NBD_DO_IT":           {nbdDoIt, io(3)},
		"NBD_CLEAR_SOCK":      {nbdClearSock, io(4)},
		"NBD_SET_SIZE_BLOCKS": {nbdSetSizeBlocks, io(7)},
		"NBD_DISCONNECT":      {nbdDisconnect, io(8)},
		"NBD_SET_TIMEOUT":     {nbdSetTimeout, io(9)},
		"NBD_SET_FLAGS":       {nbdSetFlags, io(10)},
	} {
		if c[0] != c[1] {
			t.Errorf("%s = %#x; want %#x", name, c[0], c[1])
		}
	}
}

func TestStateName(t *testing.T) {
	if got := stateName("pvc-1_a.b"); got != "pvc-1_a.b.json" {
		t.Errorf("stateName = %q", got)
	}
	if got := stateName("a/../b c"); got != "a%2f..%2fb%20c.json" {
		t.Errorf("stateName escapes = %q", got)
	}
}
