package attach

import (
	"fmt"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// kernelServerFlags computes NBD_ATTR_SERVER_FLAGS (or the NBD_SET_FLAGS
// argument) from the transmission flags the server really advertised. The
// kernel reads them as the server's promises: it sends FLUSH only with
// SEND_FLUSH (without it the device is treated as having no write cache and
// fsync reaches nobody), FUA only with SEND_FUA as well, TRIM with SEND_TRIM,
// and refuses several connections without CAN_MULTI_CONN. Passing anything
// the server did not advertise would make the kernel send commands the server
// must reject, so nothing is added except READ_ONLY on request.
func kernelServerFlags(advertised uint16, readOnly bool) (uint64, error) {
	if advertised&nbdproto.FlagHasFlags == 0 {
		// The protocol requires HAS_FLAGS; without it no other bit means anything.
		return 0, fmt.Errorf("server transmission flags %#x lack NBD_FLAG_HAS_FLAGS", advertised)
	}
	f := uint64(advertised)
	if readOnly {
		f |= uint64(nbdproto.FlagReadOnly)
	}
	return f, nil
}

// connectionCount decides how many sockets to hand the kernel. The kernel
// makes one hardware queue per connection, so more connections mean more
// parallel requests; but several are only safe when the server promises
// CAN_MULTI_CONN (a FLUSH on one connection covers writes on all), and the
// kernel refuses them otherwise.
func connectionCount(advertised uint16, requested, ncpu int) int {
	if advertised&nbdproto.FlagCanMultiConn == 0 {
		return 1
	}
	n := requested
	if n <= 0 {
		n = ncpu
		if n > 4 {
			n = 4
		}
	}
	if n > maxConnections {
		n = maxConnections
	}
	if n < 1 {
		n = 1
	}
	return n
}

// maxConnections bounds a caller's request: each connection is a socket, a
// kernel receive worker and a server goroutine set.
const maxConnections = 16

// missingFeatures lists what the kernel will not do because the server did
// not advertise it, for the attach log.
func missingFeatures(advertised uint16) []string {
	var m []string
	if advertised&nbdproto.FlagSendFlush == 0 {
		m = append(m, "flush (fsync is not passed to the server)")
	}
	if advertised&nbdproto.FlagSendFUA == 0 {
		m = append(m, "fua")
	}
	if advertised&nbdproto.FlagSendTrim == 0 {
		m = append(m, "trim")
	}
	return m
}
