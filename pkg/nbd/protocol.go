package nbd

import (
	"encoding/binary"
	"errors"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Wire constants. Those go-nbd defines are taken from its protocol package;
// the rest (which go-nbd lacks) follow NetworkBlockDevice/nbd doc/proto.md.
const (
	magicNBD       = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	magicOption    = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	magicOptReply  = protocol.NEGOTIATION_MAGIC_REPLY
	magicRequest   = protocol.TRANSMISSION_MAGIC_REQUEST
	magicReply     = protocol.TRANSMISSION_MAGIC_REPLY
	requestHdrSize = 28
	replyHdrSize   = 16
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle   = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes        = uint16(1 << 1)
	clientFixedNewstyle = uint32(1 << 0)
	clientNoZeroes      = uint32(1 << 1)
	clientKnownFlags    = clientFixedNewstyle | clientNoZeroes
)

// Options.
const (
	optExportName     = uint32(1)
	optAbort          = protocol.NEGOTIATION_ID_OPTION_ABORT
	optList           = protocol.NEGOTIATION_ID_OPTION_LIST
	optInfo           = protocol.NEGOTIATION_ID_OPTION_INFO
	optGo             = protocol.NEGOTIATION_ID_OPTION_GO
	optStructuredRepl = uint32(8)
)

// Option reply types.
const (
	repAck        = protocol.NEGOTIATION_TYPE_REPLY_ACK
	repServer     = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	repInfo       = protocol.NEGOTIATION_TYPE_REPLY_INFO
	repErrUnsup   = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	repErrPolicy  = uint32(1<<31 | 2)
	repErrInvalid = uint32(1<<31 | 3)
	repErrUnknown = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	repErrShutdwn = uint32(1<<31 | 7)
	repErrTooBig  = uint32(1<<31 | 9)
)

// Info types for NBD_REP_INFO.
const (
	infoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	infoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	infoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	infoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags.
const (
	FlagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	FlagReadOnly        = uint16(1 << 1)
	FlagSendFlush       = uint16(1 << 2)
	FlagSendFUA         = uint16(1 << 3)
	FlagRotational      = uint16(1 << 4)
	FlagSendTrim        = uint16(1 << 5)
	FlagSendWriteZeroes = uint16(1 << 6)
	FlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
)

// Commands.
const (
	cmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	cmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	cmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	cmdFlush       = uint16(3)
	cmdTrim        = uint16(4)
	cmdCache       = uint16(5)
	cmdWriteZeroes = uint16(6)
	cmdBlockStatus = uint16(7)
)

// Command flags.
const (
	cmdFlagFUA    = uint16(1 << 0)
	cmdFlagNoHole = uint16(1 << 1)
)

// Error values sent in simple replies (Linux errno numbers, fixed by the spec).
const (
	errPerm     = protocol.TRANSMISSION_ERROR_EPERM
	errIO       = uint32(5)
	errNoMem    = uint32(12)
	errInval    = protocol.TRANSMISSION_ERROR_EINVAL
	errNoSpc    = uint32(28)
	errOverflow = uint32(75)
	errNotSup   = uint32(95)
	errShutdown = uint32(108)
)

// Limits.
const (
	// MaxPayload is the largest READ or WRITE accepted (and advertised as
	// the maximum block size): the Linux driver's largest request.
	MaxPayload = 32 << 20
	// maxOptionLen bounds an option's payload: an export name is at most
	// 4096 bytes, plus a few info requests. Anything larger is hostile.
	maxOptionLen = 16 << 10
	// maxOptions bounds the options one client may send before it must go
	// to transmission, so a client cannot keep a handshake alive forever.
	maxOptions = 4096
)

// request is one parsed transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

var errBadMagic = errors.New("bad request magic")

// parseRequest decodes a request header. Only the magic is checked here:
// everything else is validated against the export by the caller, because
// the right reaction (error reply or disconnect) depends on the command.
// Hand-decoded rather than binary.Read into go-nbd's struct: this is the hot
// path and reflection costs more than the rest of a 4K request.
func parseRequest(b *[requestHdrSize]byte) (request, error) {
	if binary.BigEndian.Uint32(b[0:4]) != magicRequest {
		return request{}, errBadMagic
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		handle: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// putReply encodes a simple reply header.
func putReply(b []byte, errno uint32, handle uint64) {
	binary.BigEndian.PutUint32(b[0:4], magicReply)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], handle)
}

// Errno maps a backend error to the NBD error value sent to the client.
// Anything not recognised is EIO: the client must not assume more.
func Errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES):
		return errPerm
	case errors.Is(err, syscall.EINVAL):
		return errInval
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, syscall.ENOMEM):
		return errNoMem
	case errors.Is(err, syscall.EOVERFLOW):
		return errOverflow
	case errors.Is(err, syscall.ENOTSUP):
		return errNotSup
	case errors.Is(err, syscall.ESHUTDOWN):
		return errShutdown
	default:
		return errIO
	}
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "READ"
	case cmdWrite:
		return "WRITE"
	case cmdDisc:
		return "DISC"
	case cmdFlush:
		return "FLUSH"
	case cmdTrim:
		return "TRIM"
	case cmdCache:
		return "CACHE"
	case cmdWriteZeroes:
		return "WRITE_ZEROES"
	case cmdBlockStatus:
		return "BLOCK_STATUS"
	default:
		return "UNKNOWN"
	}
}
