// Package nbdproto owns the Network Block Device protocol's wire format for
// the whole project: its constants (magics, options, reply types, info
// types, transmission flags, commands, command flags, error values) and its
// fixed-size structures (request and reply headers, the export information
// a client learns in OPT_GO). The server (package nbd), the kernel and
// fallback attach paths and the relay (package attach) all speak through
// it, so a value is written down once.
//
// Source: the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).
// Where github.com/pojntfx/go-nbd's protocol package (v0.3.2) defines a
// value, it is taken from there; the rest, which go-nbd lacks, follows the
// document. Every value here is part of the wire format and never changes.
//
// Layouts (all integers big-endian):
//
//	request (28 bytes)    magic u32 | command flags u16 | type u16 | handle u64 | offset u64 | length u32
//	simple reply (16)     magic u32 | error u32 | handle u64
//	greeting (18)         "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16
//	option (16 + n)       "IHAVEOPT" u64 | option u32 | length u32 | data
//	option reply (20 + n) magic u64 | option u32 | reply type u32 | length u32 | data
package nbdproto

import (
	"encoding/binary"
	"errors"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Magics and header sizes.
const (
	MagicNBD      = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	MagicOption   = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	MagicOptReply = protocol.NEGOTIATION_MAGIC_REPLY
	MagicRequest  = protocol.TRANSMISSION_MAGIC_REQUEST
	MagicReply    = protocol.TRANSMISSION_MAGIC_REPLY

	GreetingSize       = 18
	OptionHeaderSize   = 16
	OptReplyHeaderSize = 20
	RequestHeaderSize  = 28
	ReplyHeaderSize    = 16
)

// Handshake flags (server) and client flags.
const (
	FlagFixedNewstyle   = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	FlagNoZeroes        = uint16(1 << 1)
	ClientFixedNewstyle = uint32(1 << 0)
	ClientNoZeroes      = uint32(1 << 1)
	ClientKnownFlags    = ClientFixedNewstyle | ClientNoZeroes
)

// Options.
const (
	OptExportName      = uint32(1)
	OptAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	OptList            = protocol.NEGOTIATION_ID_OPTION_LIST
	OptInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	OptGo              = protocol.NEGOTIATION_ID_OPTION_GO
	OptStructuredReply = uint32(8)
)

// Option reply types. Error types have RepErrBit set.
const (
	RepAck         = protocol.NEGOTIATION_TYPE_REPLY_ACK
	RepServer      = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	RepInfo        = protocol.NEGOTIATION_TYPE_REPLY_INFO
	RepErrBit      = uint32(1 << 31)
	RepErrUnsup    = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	RepErrPolicy   = RepErrBit | 2
	RepErrInvalid  = RepErrBit | 3
	RepErrUnknown  = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	RepErrShutdown = RepErrBit | 7
	RepErrTooBig   = RepErrBit | 9
)

// Info types in NBD_REP_INFO.
const (
	InfoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	InfoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	InfoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	InfoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
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
	FlagSendDF          = uint16(1 << 7)
	FlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	FlagSendResize      = uint16(1 << 9)
	FlagSendCache       = uint16(1 << 10)
	FlagSendFastZero    = uint16(1 << 11)
)

// Commands.
const (
	CmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	CmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	CmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	CmdFlush       = uint16(3)
	CmdTrim        = uint16(4)
	CmdCache       = uint16(5)
	CmdWriteZeroes = uint16(6)
	CmdBlockStatus = uint16(7)
)

// Command flags.
const (
	CmdFlagFUA      = uint16(1 << 0)
	CmdFlagNoHole   = uint16(1 << 1)
	CmdFlagDF       = uint16(1 << 2)
	CmdFlagReqOne   = uint16(1 << 3)
	CmdFlagFastZero = uint16(1 << 4)
)

// Error values in simple replies (Linux errno numbers, fixed by the spec).
const (
	ErrPerm     = protocol.TRANSMISSION_ERROR_EPERM
	ErrIO       = uint32(5)
	ErrNoMem    = uint32(12)
	ErrInval    = protocol.TRANSMISSION_ERROR_EINVAL
	ErrNoSpc    = uint32(28)
	ErrOverflow = uint32(75)
	ErrNotSup   = uint32(95)
	ErrShutdown = uint32(108)
)

// MaxPayload is the largest READ or WRITE the project sends or accepts:
// the Linux driver's largest request.
const MaxPayload = 32 << 20

// Request is one transmission request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// ErrBadMagic is returned for a header whose magic is wrong.
var ErrBadMagic = errors.New("nbd: bad magic")

// ParseRequest decodes a request header. Only the magic is checked: the
// right reaction to anything else depends on the command and the export.
// Hand-decoded rather than binary.Read into go-nbd's struct: this is the
// hot path, and reflection costs more than the rest of a 4K request.
func ParseRequest(b *[RequestHeaderSize]byte) (Request, error) {
	if binary.BigEndian.Uint32(b[0:4]) != MagicRequest {
		return Request{}, ErrBadMagic
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Handle: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// AppendRequest appends the encoded header of r to b.
func AppendRequest(b []byte, r Request) []byte {
	b = binary.BigEndian.AppendUint32(b, MagicRequest)
	b = binary.BigEndian.AppendUint16(b, r.Flags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Handle)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	return binary.BigEndian.AppendUint32(b, r.Length)
}

// PutReply encodes a simple reply header into b[:ReplyHeaderSize].
func PutReply(b []byte, errno uint32, handle uint64) {
	binary.BigEndian.PutUint32(b[0:4], MagicReply)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], handle)
}

// Reply is a decoded simple reply header.
type Reply struct {
	Errno  uint32
	Handle uint64
}

// ParseReply decodes a simple reply header.
func ParseReply(b *[ReplyHeaderSize]byte) (Reply, error) {
	if binary.BigEndian.Uint32(b[0:4]) != MagicReply {
		return Reply{}, ErrBadMagic
	}
	return Reply{Errno: binary.BigEndian.Uint32(b[4:8]), Handle: binary.BigEndian.Uint64(b[8:16])}, nil
}

// ExportInfo is what a server tells a client about an export in OPT_GO or
// OPT_INFO: NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE.
type ExportInfo struct {
	Size  uint64
	Flags uint16 // transmission flags as advertised
	// Block size constraints (NBD_INFO_BLOCK_SIZE); zero when not sent.
	MinBlock, PrefBlock, MaxBlock uint32
}

// AppendInfoExport appends the body of an NBD_REP_INFO of type
// NBD_INFO_EXPORT.
func AppendInfoExport(b []byte, size uint64, flags uint16) []byte {
	b = binary.BigEndian.AppendUint16(b, InfoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

// AppendOptReply appends an option reply (header and body).
func AppendOptReply(b []byte, opt, typ uint32, body []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, MagicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
	return append(b, body...)
}

// AppendOption appends a client option (header and data).
func AppendOption(b []byte, opt uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, MagicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// CmdName names a command for logs.
func CmdName(t uint16) string {
	switch t {
	case CmdRead:
		return "READ"
	case CmdWrite:
		return "WRITE"
	case CmdDisc:
		return "DISC"
	case CmdFlush:
		return "FLUSH"
	case CmdTrim:
		return "TRIM"
	case CmdCache:
		return "CACHE"
	case CmdWriteZeroes:
		return "WRITE_ZEROES"
	case CmdBlockStatus:
		return "BLOCK_STATUS"
	default:
		return "UNKNOWN"
	}
}

// Handshake structures, go-nbd's (encoded with encoding/binary, big-endian).
type (
	// NewstyleHeader is the server's greeting.
	NewstyleHeader = protocol.NegotiationNewstyleHeader
	// OptionHeader starts a client option.
	OptionHeader = protocol.NegotiationOptionHeader
	// OptReplyHeader starts a server's option reply.
	OptReplyHeader = protocol.NegotiationReplyHeader
)
