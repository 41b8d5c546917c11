package nbd

import (
	"errors"
	"syscall"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// The wire format (constants, headers) is package nbdproto's; this file
// holds the server's own limits and its mapping of errors to NBD errors.

// MaxPayload is the largest READ or WRITE accepted (and advertised as the
// maximum block size): the Linux driver's largest request.
const MaxPayload = nbdproto.MaxPayload

// Transmission flags, re-exported for the server's users.
const (
	FlagHasFlags        = nbdproto.FlagHasFlags
	FlagReadOnly        = nbdproto.FlagReadOnly
	FlagSendFlush       = nbdproto.FlagSendFlush
	FlagSendFUA         = nbdproto.FlagSendFUA
	FlagRotational      = nbdproto.FlagRotational
	FlagSendTrim        = nbdproto.FlagSendTrim
	FlagSendWriteZeroes = nbdproto.FlagSendWriteZeroes
	FlagCanMultiConn    = nbdproto.FlagCanMultiConn
)

const (
	// maxOptionLen bounds an option's payload: an export name is at most
	// 4096 bytes, plus a few info requests. Anything larger is hostile.
	maxOptionLen = 16 << 10
	// maxOptions bounds the options one client may send before it must go
	// to transmission, so a client cannot keep a handshake alive forever.
	maxOptions = 4096
)

// Errno maps a backend error to the NBD error value sent to the client.
// Anything not recognised is EIO: the client must not assume more.
func Errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES):
		return nbdproto.ErrPerm
	case errors.Is(err, syscall.EINVAL):
		return nbdproto.ErrInval
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return nbdproto.ErrNoSpc
	case errors.Is(err, syscall.ENOMEM):
		return nbdproto.ErrNoMem
	case errors.Is(err, syscall.EOVERFLOW):
		return nbdproto.ErrOverflow
	case errors.Is(err, syscall.ENOTSUP):
		return nbdproto.ErrNotSup
	case errors.Is(err, syscall.ESHUTDOWN):
		return nbdproto.ErrShutdown
	default:
		return nbdproto.ErrIO
	}
}
