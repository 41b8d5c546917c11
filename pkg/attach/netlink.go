package attach

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// Generic netlink family "nbd", from include/uapi/linux/nbd-netlink.h. These
// numbers are kernel ABI: they never change.
const (
	nbdGenlName    = "nbd"
	nbdGenlVersion = 1
	nbdMcastGroup  = "nbd_mc_group"

	// enum NBD_CMD_*
	nbdCmdConnect     = 1
	nbdCmdDisconnect  = 2
	nbdCmdReconfigure = 3
	nbdCmdLinkDead    = 4
	nbdCmdStatus      = 5

	// enum NBD_ATTR_* (policy in drivers/block/nbd.c nbd_attr_policy)
	nbdAttrIndex           = 1  // u32
	nbdAttrSizeBytes       = 2  // u64
	nbdAttrBlockSizeBytes  = 3  // u64
	nbdAttrTimeout         = 4  // u64, seconds
	nbdAttrServerFlags     = 5  // u64, transmission flags
	nbdAttrClientFlags     = 6  // u64, NBD_CFLAG_*
	nbdAttrSockets         = 7  // nested list of NBD_SOCK_ITEM
	nbdAttrDeadConnTimeout = 8  // u64, seconds
	nbdAttrDeviceList      = 9  // nested list of NBD_DEVICE_ITEM (STATUS reply)
	nbdAttrBackend         = 10 // NUL-terminated string

	nbdSockItem = 1 // nested, holds nbdSockFD
	nbdSockFD   = 1 // u32

	nbdDeviceItem      = 1 // nested
	nbdDeviceIndex     = 1 // u32
	nbdDeviceConnected = 2 // u8

	// NBD_ATTR_CLIENT_FLAGS stays unset: neither
	// NBD_CFLAG_DESTROY_ON_DISCONNECT (1<<0) nor NBD_CFLAG_DISCONNECT_ON_CLOSE
	// (1<<1), since the device must outlive the attaching process (the
	// point of netlink over ioctl), and stay until explicitly disconnected.
)

// connectRequest is everything CONNECT and RECONFIGURE carry.
type connectRequest struct {
	Index           int // -1: let the kernel pick a free device (CONNECT only)
	SizeBytes       uint64
	BlockSize       uint64
	TimeoutSec      uint64 // 0: attribute omitted (kernel default 30 s)
	DeadConnSec     uint64 // 0: attribute omitted
	ServerFlags     uint64
	Backend         string
	FDs             []int
	reconfigureOnly bool // RECONFIGURE: omit size, block size and flags
}

// encodeConnectAttrs encodes the attributes of CONNECT (or RECONFIGURE with
// reconfigureOnly). It is a pure function so the bytes can be checked against
// hand-assembled encodings in tests.
func encodeConnectAttrs(r connectRequest) ([]byte, error) {
	if len(r.FDs) == 0 {
		return nil, errors.New("nbd netlink: at least one socket is required")
	}
	ae := netlink.NewAttributeEncoder()
	if r.Index >= 0 {
		if r.Index > math.MaxInt32 {
			return nil, fmt.Errorf("nbd netlink: index %d out of range", r.Index)
		}
		ae.Uint32(nbdAttrIndex, uint32(r.Index))
	} else if r.reconfigureOnly {
		return nil, errors.New("nbd netlink: RECONFIGURE needs a device index")
	}
	if !r.reconfigureOnly {
		if r.SizeBytes == 0 {
			return nil, errors.New("nbd netlink: size must be positive")
		}
		ae.Uint64(nbdAttrSizeBytes, r.SizeBytes)
		if r.BlockSize != 0 {
			ae.Uint64(nbdAttrBlockSizeBytes, r.BlockSize)
		}
	}
	if r.TimeoutSec != 0 {
		ae.Uint64(nbdAttrTimeout, r.TimeoutSec)
	}
	if !r.reconfigureOnly {
		ae.Uint64(nbdAttrServerFlags, r.ServerFlags)
	}
	if r.DeadConnSec != 0 {
		ae.Uint64(nbdAttrDeadConnTimeout, r.DeadConnSec)
	}
	if r.Backend != "" {
		// RECONFIGURE must repeat the backend: the kernel refuses to
		// reconfigure a device with a backend unless it matches.
		ae.String(nbdAttrBackend, r.Backend)
	}
	for _, fd := range r.FDs {
		if fd < 0 {
			return nil, fmt.Errorf("nbd netlink: bad socket fd %d", fd)
		}
	}
	ae.Nested(nbdAttrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, fd := range r.FDs {
			nae.Nested(nbdSockItem, func(ie *netlink.AttributeEncoder) error {
				ie.Uint32(nbdSockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
	return ae.Encode()
}

// encodeResizeAttrs encodes a RECONFIGURE that only changes the size:
// the index, the new size and the backend (which RECONFIGURE must repeat).
func encodeResizeAttrs(index int, size uint64, backend string) ([]byte, error) {
	if index < 0 || index > math.MaxInt32 {
		return nil, fmt.Errorf("nbd netlink: index %d out of range", index)
	}
	if size == 0 {
		return nil, errors.New("nbd netlink: size must be positive")
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nbdAttrIndex, uint32(index))
	ae.Uint64(nbdAttrSizeBytes, size)
	if backend != "" {
		ae.String(nbdAttrBackend, backend)
	}
	return ae.Encode()
}

// encodeIndexAttrs encodes a lone NBD_ATTR_INDEX (DISCONNECT, STATUS).
func encodeIndexAttrs(index int) ([]byte, error) {
	if index < 0 || index > math.MaxInt32 {
		return nil, fmt.Errorf("nbd netlink: index %d out of range", index)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nbdAttrIndex, uint32(index))
	return ae.Encode()
}

// decodeIndex finds NBD_ATTR_INDEX in a CONNECT reply or a LINK_DEAD event.
func decodeIndex(b []byte) (int, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, err
	}
	idx := -1
	for ad.Next() {
		if ad.Type() == nbdAttrIndex {
			idx = int(ad.Uint32())
		}
	}
	if err := ad.Err(); err != nil {
		return 0, err
	}
	if idx < 0 {
		return 0, errors.New("nbd netlink: reply without NBD_ATTR_INDEX")
	}
	if idx > math.MaxInt32 {
		// The kernel's indexes are ints; a larger one could not be
		// addressed again (encodeIndexAttrs refuses it).
		return 0, fmt.Errorf("nbd netlink: NBD_ATTR_INDEX %d out of range", idx)
	}
	return idx, nil
}

// deviceStatus is one entry of a STATUS reply.
type deviceStatus struct {
	Index     int
	Connected bool
}

// decodeStatus parses a STATUS reply's NBD_ATTR_DEVICE_LIST.
func decodeStatus(b []byte) ([]deviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var out []deviceStatus
	for ad.Next() {
		if ad.Type() != nbdAttrDeviceList {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != nbdDeviceItem {
					continue
				}
				d := deviceStatus{Index: -1}
				list.Nested(func(item *netlink.AttributeDecoder) error {
					for item.Next() {
						switch item.Type() {
						case nbdDeviceIndex:
							d.Index = int(item.Uint32())
						case nbdDeviceConnected:
							d.Connected = item.Uint8() != 0
						}
					}
					return nil
				})
				switch {
				case d.Index > math.MaxInt32:
					return fmt.Errorf("nbd netlink: device index %d out of range", d.Index)
				case d.Index >= 0:
					out = append(out, d)
				}
			}
			return nil
		})
	}
	return out, ad.Err()
}

// ErrNoNetlink is returned when the kernel has no "nbd" generic netlink
// family (nbd not loaded, or a kernel older than 4.12).
var ErrNoNetlink = errors.New("kernel has no nbd generic netlink family")

// nlClient talks to the kernel's nbd family. One netlink socket per call
// keeps replies of different requests from ever mixing.
type nlClient struct {
	conn   *genetlink.Conn
	family genetlink.Family
}

func dialNBDNetlink() (*nlClient, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("dial generic netlink: %w", err)
	}
	f, err := c.GetFamily(nbdGenlName)
	if err != nil {
		c.Close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNoNetlink
		}
		return nil, fmt.Errorf("resolve generic netlink family %q: %w (%w)", nbdGenlName, err, ErrNoNetlink)
	}
	return &nlClient{conn: c, family: f}, nil
}

func (c *nlClient) Close() error { return c.conn.Close() }

func (c *nlClient) do(cmd uint8, attrs []byte, flags netlink.HeaderFlags) ([]genetlink.Message, error) {
	msg := genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: nbdGenlVersion},
		Data:   attrs,
	}
	return c.conn.Execute(msg, c.family.ID, flags)
}

// connect sends CONNECT and returns the device index the kernel used.
// No Acknowledge flag: the kernel answers success with a reply carrying the
// index (and failure with an error message), as nbd-client expects.
func (c *nlClient) connect(r connectRequest) (int, error) {
	attrs, err := encodeConnectAttrs(r)
	if err != nil {
		return -1, err
	}
	msgs, err := c.do(nbdCmdConnect, attrs, netlink.Request)
	if err != nil {
		return -1, fmt.Errorf("nbd netlink CONNECT: %w", err)
	}
	for _, m := range msgs {
		if idx, err := decodeIndex(m.Data); err == nil {
			return idx, nil
		}
	}
	return -1, errors.New("nbd netlink CONNECT: no index in reply")
}

func (c *nlClient) reconfigure(r connectRequest) error {
	r.reconfigureOnly = true
	attrs, err := encodeConnectAttrs(r)
	if err != nil {
		return err
	}
	if _, err := c.do(nbdCmdReconfigure, attrs, netlink.Request|netlink.Acknowledge); err != nil {
		return fmt.Errorf("nbd netlink RECONFIGURE nbd%d: %w", r.Index, err)
	}
	return nil
}

// resize sends RECONFIGURE with a new NBD_ATTR_SIZE_BYTES and no
// sockets: the kernel sets the live device's capacity (nbd_genl_size_set).
func (c *nlClient) resize(index int, size uint64, backend string) error {
	attrs, err := encodeResizeAttrs(index, size, backend)
	if err != nil {
		return err
	}
	if _, err := c.do(nbdCmdReconfigure, attrs, netlink.Request|netlink.Acknowledge); err != nil {
		return fmt.Errorf("nbd netlink RECONFIGURE nbd%d size %d: %w", index, size, err)
	}
	return nil
}

func (c *nlClient) disconnect(index int) error {
	attrs, err := encodeIndexAttrs(index)
	if err != nil {
		return err
	}
	if _, err := c.do(nbdCmdDisconnect, attrs, netlink.Request|netlink.Acknowledge); err != nil {
		return fmt.Errorf("nbd netlink DISCONNECT nbd%d: %w", index, err)
	}
	return nil
}

// linkDeadGroup returns the multicast group id on which the kernel announces
// NBD_CMD_LINK_DEAD, or 0 when the family has none.
func (c *nlClient) linkDeadGroup() uint32 {
	for _, g := range c.family.Groups {
		if g.Name == nbdMcastGroup {
			return g.ID
		}
	}
	return 0
}

// watchLinkDead calls fn with the device index of every NBD_CMD_LINK_DEAD
// the kernel multicasts (a device lost a connection and is now holding I/O
// for up to its dead-connection timeout) until ctx ends.
func watchLinkDead(ctx context.Context, fn func(index int)) error {
	c, err := dialNBDNetlink()
	if err != nil {
		return err
	}
	defer c.Close()
	g := c.linkDeadGroup()
	if g == 0 {
		return fmt.Errorf("nbd netlink: no %q multicast group", nbdMcastGroup)
	}
	if err := c.conn.JoinGroup(g); err != nil {
		return fmt.Errorf("nbd netlink: join %q: %w", nbdMcastGroup, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetReadDeadline(time.Now()) })
	defer stop()
	for {
		msgs, _, err := c.conn.Receive()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("nbd netlink: receive: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Command != nbdCmdLinkDead {
				continue
			}
			if idx, err := decodeIndex(m.Data); err == nil {
				fn(idx)
			}
		}
	}
}
