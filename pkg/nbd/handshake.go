package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pojntfx/go-nbd/pkg/protocol"
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
	if err := binary.Write(bw, binary.BigEndian, protocol.NegotiationNewstyleHeader{
		OldstyleMagic:  magicNBD,
		OptionMagic:    magicOption,
		HandshakeFlags: flagFixedNewstyle | flagNoZeroes,
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
	if cflags&^clientKnownFlags != 0 {
		// The spec: the server MUST close if it does not know a client flag.
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	noZeroes := cflags&clientNoZeroes != 0

	var payload []byte
	for n := 0; ; n++ {
		if n >= maxOptions {
			return nil, fmt.Errorf("more than %d options", maxOptions)
		}
		var hdr protocol.NegotiationOptionHeader
		if err := binary.Read(br, binary.BigEndian, &hdr); err != nil {
			return nil, fmt.Errorf("read option header: %w", err)
		}
		if hdr.OptionMagic != magicOption {
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
		if src.shuttingDown() && hdr.ID != optAbort {
			if err := optReply(bw, hdr.ID, repErrShutdwn, []byte("server shutting down")); err != nil {
				return nil, err
			}
			continue
		}
		switch hdr.ID {
		case optExportName:
			exp := src.lookupExport(string(payload))
			if exp == nil {
				// No way to say no to EXPORT_NAME but to hang up.
				return nil, fmt.Errorf("unknown export %q", payload)
			}
			var b [8 + 2 + 124]byte
			binary.BigEndian.PutUint64(b[0:8], exp.size)
			binary.BigEndian.PutUint16(b[8:10], exp.flags)
			out := b[:]
			if noZeroes {
				out = b[:10]
			}
			if _, err := bw.Write(out); err != nil {
				return nil, err
			}
			return exp, bw.Flush()
		case optAbort:
			_ = optReply(bw, hdr.ID, repAck, nil) // the client may already be gone
			return nil, errAbort
		case optList:
			if len(payload) != 0 {
				if err := optReply(bw, hdr.ID, repErrInvalid, []byte("NBD_OPT_LIST takes no data")); err != nil {
					return nil, err
				}
				continue
			}
			for _, name := range src.exportNames() {
				b := make([]byte, 4+len(name))
				binary.BigEndian.PutUint32(b, uint32(len(name)))
				copy(b[4:], name)
				if err := optReply(bw, hdr.ID, repServer, b); err != nil {
					return nil, err
				}
			}
			if err := optReply(bw, hdr.ID, repAck, nil); err != nil {
				return nil, err
			}
		case optInfo, optGo:
			exp, err := replyInfo(src, bw, hdr.ID, payload)
			if err != nil {
				return nil, err
			}
			if exp != nil && hdr.ID == optGo {
				return exp, bw.Flush()
			}
		default:
			// Includes NBD_OPT_STRUCTURED_REPLY: we only send simple
			// replies, which every client must accept after ERR_UNSUP.
			if err := optReply(bw, hdr.ID, repErrUnsup, nil); err != nil {
				return nil, err
			}
		}
	}
}

// replyInfo answers NBD_OPT_INFO / NBD_OPT_GO. It returns the export when
// the option succeeded, nil (and no error) when an error reply was sent.
func replyInfo(src exportSource, bw *bufio.Writer, opt uint32, p []byte) (*exportState, error) {
	if len(p) < 4 {
		return nil, optReply(bw, opt, repErrInvalid, []byte("option data too short"))
	}
	nameLen := binary.BigEndian.Uint32(p)
	if uint64(nameLen)+6 > uint64(len(p)) {
		return nil, optReply(bw, opt, repErrInvalid, []byte("export name length exceeds option data"))
	}
	name := string(p[4 : 4+nameLen])
	rest := p[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return nil, optReply(bw, opt, repErrInvalid, []byte("information request count does not match option length"))
	}
	exp := src.lookupExport(name)
	if exp == nil {
		return nil, optReply(bw, opt, repErrUnknown, []byte("no export named "+name))
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	var b [18]byte
	binary.BigEndian.PutUint16(b[0:2], infoExport)
	binary.BigEndian.PutUint64(b[2:10], exp.size)
	binary.BigEndian.PutUint16(b[10:12], exp.flags)
	if err := optReply(bw, opt, repInfo, b[:12]); err != nil {
		return nil, err
	}
	if wantName {
		nb := make([]byte, 2+len(exp.Name))
		binary.BigEndian.PutUint16(nb, infoName)
		copy(nb[2:], exp.Name)
		if err := optReply(bw, opt, repInfo, nb); err != nil {
			return nil, err
		}
	}
	if wantDesc && exp.Description != "" {
		db := make([]byte, 2+len(exp.Description))
		binary.BigEndian.PutUint16(db, infoDescription)
		copy(db[2:], exp.Description)
		if err := optReply(bw, opt, repInfo, db); err != nil {
			return nil, err
		}
	}
	// Block sizes are sent whether asked for or not (the spec allows it):
	// a client that ignores them still works, since we accept any alignment.
	binary.BigEndian.PutUint16(b[0:2], infoBlockSize)
	binary.BigEndian.PutUint32(b[2:6], exp.minBS)
	binary.BigEndian.PutUint32(b[6:10], exp.prefBS)
	binary.BigEndian.PutUint32(b[10:14], exp.maxBS)
	if err := optReply(bw, opt, repInfo, b[:14]); err != nil {
		return nil, err
	}
	if err := optReply(bw, opt, repAck, nil); err != nil {
		return nil, err
	}
	return exp, nil
}

func optReply(bw *bufio.Writer, opt, typ uint32, data []byte) error {
	if err := binary.Write(bw, binary.BigEndian, protocol.NegotiationReplyHeader{
		ReplyMagic: magicOptReply,
		ID:         opt,
		Type:       typ,
		Length:     uint32(len(data)),
	}); err != nil {
		return err
	}
	if _, err := bw.Write(data); err != nil {
		return err
	}
	if typ == repServer || (typ == repInfo) {
		return nil // more replies to this option follow
	}
	return bw.Flush()
}
