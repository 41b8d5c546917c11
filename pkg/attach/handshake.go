package attach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// NBD handshake constants (NBD protocol document, "Fixed newstyle
// negotiation"). Only what a client doing OPT_GO needs.
const (
	nbdMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	nbdIHaveOpt       = 0x49484156454f5054 // "IHAVEOPT"
	nbdOptReplyMagic  = 0x3e889045565a9
	flagFixedNewstyle = 1 << 0 // server handshake flag
	flagNoZeroes      = 1 << 1 // server handshake flag
	clientFixed       = 1 << 0 // client flag NBD_FLAG_C_FIXED_NEWSTYLE
	clientNoZeroes    = 1 << 1 // client flag NBD_FLAG_C_NO_ZEROES

	optAbort = 2
	optGo    = 7

	repAck      = 1
	repInfo     = 3
	repErrBit   = 1 << 31
	infoExport  = 0
	infoBlkSize = 3

	// maxOptReply bounds a single option reply we are willing to read, so a
	// broken peer cannot make us allocate without limit.
	maxOptReply = 1 << 20
)

// Transmission flags (NBD protocol document; DESIGN-NOTES section 2).
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagRotational      uint16 = 1 << 4
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagSendDF          uint16 = 1 << 7
	FlagCanMultiConn    uint16 = 1 << 8
	FlagSendResize      uint16 = 1 << 9
	FlagSendCache       uint16 = 1 << 10
	FlagSendFastZero    uint16 = 1 << 11
)

// ExportInfo is what the server told us about an export during OPT_GO.
type ExportInfo struct {
	Size  uint64
	Flags uint16 // transmission flags as advertised
	// Block size constraints (NBD_INFO_BLOCK_SIZE); zero when not sent.
	MinBlock, PrefBlock, MaxBlock uint32
}

// ErrHandshake wraps every failure of the NBD negotiation.
var ErrHandshake = errors.New("nbd handshake failed")

// handshake runs fixed-newstyle negotiation with OPT_GO for export on conn,
// leaving conn positioned at the start of the transmission phase, ready to be
// handed to the kernel. The deadline bounds the whole exchange so a server
// that stops talking cannot hang the caller.
func handshake(conn net.Conn, export string, deadline time.Time) (ExportInfo, error) {
	var info ExportInfo
	if err := conn.SetDeadline(deadline); err != nil {
		return info, fmt.Errorf("%w: set deadline: %w", ErrHandshake, err)
	}
	defer conn.SetDeadline(time.Time{})

	var hdr [18]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return info, fmt.Errorf("%w: read greeting: %w", ErrHandshake, err)
	}
	if binary.BigEndian.Uint64(hdr[0:]) != nbdMagic {
		return info, fmt.Errorf("%w: bad magic %#x", ErrHandshake, binary.BigEndian.Uint64(hdr[0:]))
	}
	if binary.BigEndian.Uint64(hdr[8:]) != nbdIHaveOpt {
		return info, fmt.Errorf("%w: not a newstyle server (oldstyle magic %#x)", ErrHandshake, binary.BigEndian.Uint64(hdr[8:]))
	}
	sflags := binary.BigEndian.Uint16(hdr[16:])
	if sflags&flagFixedNewstyle == 0 {
		return info, fmt.Errorf("%w: server does not speak fixed newstyle", ErrHandshake)
	}
	cflags := uint32(clientFixed)
	if sflags&flagNoZeroes != 0 {
		cflags |= clientNoZeroes
	}
	if _, err := conn.Write(encodeGo(cflags, export)); err != nil {
		return info, fmt.Errorf("%w: send OPT_GO: %w", ErrHandshake, err)
	}
	gotExport := false
	for {
		var rh [20]byte
		if _, err := io.ReadFull(conn, rh[:]); err != nil {
			return info, fmt.Errorf("%w: read option reply: %w", ErrHandshake, err)
		}
		if m := binary.BigEndian.Uint64(rh[0:]); m != nbdOptReplyMagic {
			return info, fmt.Errorf("%w: bad option reply magic %#x", ErrHandshake, m)
		}
		if opt := binary.BigEndian.Uint32(rh[8:]); opt != optGo {
			return info, fmt.Errorf("%w: reply for option %d, sent %d", ErrHandshake, opt, optGo)
		}
		typ := binary.BigEndian.Uint32(rh[12:])
		n := binary.BigEndian.Uint32(rh[16:])
		if n > maxOptReply {
			return info, fmt.Errorf("%w: option reply of %d bytes", ErrHandshake, n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(conn, body); err != nil {
			return info, fmt.Errorf("%w: read option reply body: %w", ErrHandshake, err)
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return info, fmt.Errorf("%w: server acked OPT_GO without NBD_INFO_EXPORT", ErrHandshake)
			}
			return info, nil
		case typ&repErrBit != 0:
			return info, fmt.Errorf("%w: server refused export %q: error %#x: %s", ErrHandshake, export, typ, body)
		case typ == repInfo:
			if err := parseInfo(body, &info, &gotExport); err != nil {
				return info, err
			}
		default:
			// Unknown non-error reply types are to be ignored (protocol document).
		}
	}
}

// encodeGo builds client flags followed by an OPT_GO request asking for the
// export and block size information.
func encodeGo(cflags uint32, export string) []byte {
	b := binary.BigEndian.AppendUint32(nil, cflags)
	b = binary.BigEndian.AppendUint64(b, nbdIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(export)+2+2))
	b = binary.BigEndian.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint16(b, 1) // one info request
	b = binary.BigEndian.AppendUint16(b, infoBlkSize)
	return b
}

func parseInfo(body []byte, info *ExportInfo, gotExport *bool) error {
	if len(body) < 2 {
		return fmt.Errorf("%w: short NBD_REP_INFO (%d bytes)", ErrHandshake, len(body))
	}
	switch binary.BigEndian.Uint16(body) {
	case infoExport:
		if len(body) != 12 {
			return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrHandshake, len(body))
		}
		info.Size = binary.BigEndian.Uint64(body[2:])
		info.Flags = binary.BigEndian.Uint16(body[10:])
		*gotExport = true
	case infoBlkSize:
		if len(body) != 14 {
			return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrHandshake, len(body))
		}
		info.MinBlock = binary.BigEndian.Uint32(body[2:])
		info.PrefBlock = binary.BigEndian.Uint32(body[6:])
		info.MaxBlock = binary.BigEndian.Uint32(body[10:])
	}
	return nil
}

// dialExport connects to a unix socket and negotiates export on it.
func dialExport(socket, export string, timeout time.Duration) (*net.UnixConn, ExportInfo, error) {
	c, err := net.DialTimeout("unix", socket, timeout)
	if err != nil {
		return nil, ExportInfo{}, fmt.Errorf("dial %s: %w", socket, err)
	}
	uc := c.(*net.UnixConn)
	info, err := handshake(uc, export, time.Now().Add(timeout))
	if err != nil {
		uc.Close()
		return nil, info, fmt.Errorf("export %q on %s: %w", export, socket, err)
	}
	return uc, info, nil
}
