package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// errAbort ends a handshake the client aborted (NBD_OPT_ABORT): not a failure.
var errAbort = errors.New("client aborted the handshake")

// exportSource is what the handshake needs from the server: so it can be
// driven by the fuzzer without one.
type exportSource interface {
	lookupExport(name string) *exportState
	exportNames() []string
	shuttingDown() bool
}

// handshake runs fixed-newstyle negotiation and returns the export the
// client chose. Any error means the connection must be closed.
func handshake(src exportSource, br *bufio.Reader, bw *bufio.Writer) (*exportState, error) {
	if err := binary.Write(bw, binary.BigEndian, nbdproto.NewstyleHeader{
		OldstyleMagic:  nbdproto.MagicNBD,
		OptionMagic:    nbdproto.MagicOption,
		HandshakeFlags: nbdproto.FlagFixedNewstyle | nbdproto.FlagNoZeroes,
	}); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("send greeting: %w", err)
	}
	var cflags uint32
	if err := binary.Read(br, binary.BigEndian, &cflags); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	if cflags&^nbdproto.ClientKnownFlags != 0 {
		// The spec: the server MUST close if it does not know a client flag.
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	noZeroes := cflags&nbdproto.ClientNoZeroes != 0

	var payload []byte
	for n := 0; ; n++ {
		if n >= maxOptions {
			return nil, fmt.Errorf("more than %d options", maxOptions)
		}
		var hdr nbdproto.OptionHeader
		if err := binary.Read(br, binary.BigEndian, &hdr); err != nil {
			return nil, fmt.Errorf("read option header: %w", err)
		}
		if hdr.OptionMagic != nbdproto.MagicOption {
			return nil, fmt.Errorf("bad option magic %#x", hdr.OptionMagic)
		}
		if hdr.Length > maxOptionLen {
			return nil, fmt.Errorf("option %d payload of %d bytes exceeds %d", hdr.ID, hdr.Length, maxOptionLen)
		}
		if cap(payload) < int(hdr.Length) {
			payload = make([]byte, hdr.Length)
		}
		payload = payload[:hdr.Length]
		if _, err := io.ReadFull(br, payload); err != nil {
			return nil, fmt.Errorf("read option %d payload: %w", hdr.ID, err)
		}
		if src.shuttingDown() && hdr.ID != nbdproto.OptAbort {
			if err := optReply(bw, hdr.ID, nbdproto.RepErrShutdown, []byte("server shutting down")); err != nil {
				return nil, err
			}
			continue
		}
		switch hdr.ID {
		case nbdproto.OptExportName:
			exp := src.lookupExport(string(payload))
			if exp == nil {
				// No way to say no to EXPORT_NAME but to hang up.
				return nil, fmt.Errorf("unknown export %q", payload)
			}
			var b [8 + 2 + 124]byte
			binary.BigEndian.PutUint64(b[0:8], exp.size())
			binary.BigEndian.PutUint16(b[8:10], exp.flags)
			out := b[:]
			if noZeroes {
				out = b[:10]
			}
			if _, err := bw.Write(out); err != nil {
				return nil, err
			}
			return exp, bw.Flush()
		case nbdproto.OptAbort:
			_ = optReply(bw, hdr.ID, nbdproto.RepAck, nil) // the client may already be gone
			return nil, errAbort
		case nbdproto.OptList:
			if len(payload) != 0 {
				if err := optReply(bw, hdr.ID, nbdproto.RepErrInvalid, []byte("NBD_OPT_LIST takes no data")); err != nil {
					return nil, err
				}
				continue
			}
			for _, name := range src.exportNames() {
				b := make([]byte, 4+len(name))
				binary.BigEndian.PutUint32(b, uint32(len(name)))
				copy(b[4:], name)
				if err := optReply(bw, hdr.ID, nbdproto.RepServer, b); err != nil {
					return nil, err
				}
			}
			if err := optReply(bw, hdr.ID, nbdproto.RepAck, nil); err != nil {
				return nil, err
			}
		case nbdproto.OptInfo, nbdproto.OptGo:
			exp, err := replyInfo(src, bw, hdr.ID, payload)
			if err != nil {
				return nil, err
			}
			if exp != nil && hdr.ID == nbdproto.OptGo {
				return exp, bw.Flush()
			}
		default:
			// Includes NBD_OPT_STRUCTURED_REPLY: we only send simple
			// replies, which every client must accept after ERR_UNSUP.
			if err := optReply(bw, hdr.ID, nbdproto.RepErrUnsup, nil); err != nil {
				return nil, err
			}
		}
	}
}

// replyInfo answers NBD_OPT_INFO / NBD_OPT_GO. It returns the export when
// the option succeeded, nil (and no error) when an error reply was sent.
func replyInfo(src exportSource, bw *bufio.Writer, opt uint32, p []byte) (*exportState, error) {
	if len(p) < 4 {
		return nil, optReply(bw, opt, nbdproto.RepErrInvalid, []byte("option data too short"))
	}
	nameLen := binary.BigEndian.Uint32(p)
	if uint64(nameLen)+6 > uint64(len(p)) {
		return nil, optReply(bw, opt, nbdproto.RepErrInvalid, []byte("export name length exceeds option data"))
	}
	name := string(p[4 : 4+nameLen])
	rest := p[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return nil, optReply(bw, opt, nbdproto.RepErrInvalid, []byte("information request count does not match option length"))
	}
	exp := src.lookupExport(name)
	if exp == nil {
		return nil, optReply(bw, opt, nbdproto.RepErrUnknown, []byte("no export named "+name))
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case nbdproto.InfoName:
			wantName = true
		case nbdproto.InfoDescription:
			wantDesc = true
		}
	}
	var b [18]byte
	binary.BigEndian.PutUint16(b[0:2], nbdproto.InfoExport)
	binary.BigEndian.PutUint64(b[2:10], exp.size())
	binary.BigEndian.PutUint16(b[10:12], exp.flags)
	if err := optReply(bw, opt, nbdproto.RepInfo, b[:12]); err != nil {
		return nil, err
	}
	if wantName {
		nb := make([]byte, 2+len(exp.Name))
		binary.BigEndian.PutUint16(nb, nbdproto.InfoName)
		copy(nb[2:], exp.Name)
		if err := optReply(bw, opt, nbdproto.RepInfo, nb); err != nil {
			return nil, err
		}
	}
	if wantDesc && exp.Description != "" {
		db := make([]byte, 2+len(exp.Description))
		binary.BigEndian.PutUint16(db, nbdproto.InfoDescription)
		copy(db[2:], exp.Description)
		if err := optReply(bw, opt, nbdproto.RepInfo, db); err != nil {
			return nil, err
		}
	}
	// Block sizes are sent whether asked for or not (the spec allows it):
	// a client that ignores them still works, since we accept any alignment.
	binary.BigEndian.PutUint16(b[0:2], nbdproto.InfoBlockSize)
	binary.BigEndian.PutUint32(b[2:6], exp.minBS)
	binary.BigEndian.PutUint32(b[6:10], exp.prefBS)
	binary.BigEndian.PutUint32(b[10:14], exp.maxBS)
	if err := optReply(bw, opt, nbdproto.RepInfo, b[:14]); err != nil {
		return nil, err
	}
	if err := optReply(bw, opt, nbdproto.RepAck, nil); err != nil {
		return nil, err
	}
	return exp, nil
}

func optReply(bw *bufio.Writer, opt, typ uint32, data []byte) error {
	if err := binary.Write(bw, binary.BigEndian, nbdproto.OptReplyHeader{
		ReplyMagic: nbdproto.MagicOptReply,
		ID:         opt,
		Type:       typ,
		Length:     uint32(len(data)),
	}); err != nil {
		return err
	}
	if _, err := bw.Write(data); err != nil {
		return err
	}
	if typ == nbdproto.RepServer || (typ == nbdproto.RepInfo) {
		return nil // more replies to this option follow
	}
	return bw.Flush()
}
