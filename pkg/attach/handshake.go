package attach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// maxOptReply bounds a single option reply we are willing to read, so a
// broken peer cannot make us allocate without limit.
const maxOptReply = 1 << 20

// ErrHandshake wraps every failure of the NBD negotiation.
var ErrHandshake = errors.New("nbd handshake failed")

// handshake runs fixed-newstyle negotiation with OPT_GO for export on conn,
// leaving conn positioned at the start of the transmission phase, ready to be
// handed to the kernel. The deadline bounds the whole exchange so a server
// that stops talking cannot hang the caller.
func handshake(conn net.Conn, export string, deadline time.Time) (nbdproto.ExportInfo, error) {
	var info nbdproto.ExportInfo
	if err := conn.SetDeadline(deadline); err != nil {
		return info, fmt.Errorf("%w: set deadline: %w", ErrHandshake, err)
	}
	defer conn.SetDeadline(time.Time{})

	var hdr [18]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return info, fmt.Errorf("%w: read greeting: %w", ErrHandshake, err)
	}
	if binary.BigEndian.Uint64(hdr[0:]) != nbdproto.MagicNBD {
		return info, fmt.Errorf("%w: bad magic %#x", ErrHandshake, binary.BigEndian.Uint64(hdr[0:]))
	}
	if binary.BigEndian.Uint64(hdr[8:]) != nbdproto.MagicOption {
		return info, fmt.Errorf("%w: not a newstyle server (oldstyle magic %#x)", ErrHandshake, binary.BigEndian.Uint64(hdr[8:]))
	}
	sflags := binary.BigEndian.Uint16(hdr[16:])
	if sflags&nbdproto.FlagFixedNewstyle == 0 {
		return info, fmt.Errorf("%w: server does not speak fixed newstyle", ErrHandshake)
	}
	cflags := uint32(nbdproto.ClientFixedNewstyle)
	if sflags&nbdproto.FlagNoZeroes != 0 {
		cflags |= nbdproto.ClientNoZeroes
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
		if m := binary.BigEndian.Uint64(rh[0:]); m != nbdproto.MagicOptReply {
			return info, fmt.Errorf("%w: bad option reply magic %#x", ErrHandshake, m)
		}
		if opt := binary.BigEndian.Uint32(rh[8:]); opt != nbdproto.OptGo {
			return info, fmt.Errorf("%w: reply for option %d, sent %d", ErrHandshake, opt, nbdproto.OptGo)
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
		case typ == nbdproto.RepAck:
			if !gotExport {
				return info, fmt.Errorf("%w: server acked OPT_GO without NBD_INFO_EXPORT", ErrHandshake)
			}
			return info, nil
		case typ&nbdproto.RepErrBit != 0:
			return info, fmt.Errorf("%w: server refused export %q: error %#x: %s", ErrHandshake, export, typ, body)
		case typ == nbdproto.RepInfo:
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
	b = binary.BigEndian.AppendUint64(b, nbdproto.MagicOption)
	b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(export)+2+2))
	b = binary.BigEndian.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint16(b, 1) // one info request
	b = binary.BigEndian.AppendUint16(b, nbdproto.InfoBlockSize)
	return b
}

func parseInfo(body []byte, info *nbdproto.ExportInfo, gotExport *bool) error {
	if len(body) < 2 {
		return fmt.Errorf("%w: short NBD_REP_INFO (%d bytes)", ErrHandshake, len(body))
	}
	switch binary.BigEndian.Uint16(body) {
	case nbdproto.InfoExport:
		if len(body) != 12 {
			return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrHandshake, len(body))
		}
		info.Size = binary.BigEndian.Uint64(body[2:])
		info.Flags = binary.BigEndian.Uint16(body[10:])
		*gotExport = true
	case nbdproto.InfoBlockSize:
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
func dialExport(socket, export string, timeout time.Duration) (*net.UnixConn, nbdproto.ExportInfo, error) {
	c, err := net.DialTimeout("unix", socket, timeout)
	if err != nil {
		return nil, nbdproto.ExportInfo{}, fmt.Errorf("dial %s: %w", socket, err)
	}
	uc := c.(*net.UnixConn)
	info, err := handshake(uc, export, time.Now().Add(timeout))
	if err != nil {
		uc.Close()
		return nil, info, fmt.Errorf("export %q on %s: %w", export, socket, err)
	}
	return uc, info, nil
}
