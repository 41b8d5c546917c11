package layout

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Segment header field offsets (see the package doc).
const (
	sgHeaderCRC = 4
	sgID        = 8
	sgTag       = 16
	sgEpoch     = 20
	sgDataCRC   = 24
	sgCount     = 28
	sgFlags     = 30

	mbMask     = 8
	mbKind     = 9
	mbReserved = 10
	mbLength   = 12
)

// Kind says what a metablock records.
type Kind uint8

// Metablock kinds. New kinds are only ever appended.
const (
	// KindData: dirty sectors (per Mask, never 0) of a backing block; the
	// data block holds them.
	KindData Kind = 1
	// KindClean: a read-cache copy of a whole backing block (Mask 0xFF).
	KindClean Kind = 2
	// KindZero (WRITE_ZEROES): backing blocks [Block, Block+Length)
	// read as zeros from here on; copies in earlier segments are dead,
	// and the backing device is zeroed by writeback before a checkpoint
	// passes the segment. No data block, Mask 0, Length >= 1.
	KindZero Kind = 3
	// KindTrim (TRIM, format version 2): the contents of backing blocks
	// [Block, Block+Length) are unspecified from here on; copies in
	// earlier segments are dead, and nothing is owed to the backing
	// device. No data block, Mask 0, Length >= 1.
	KindTrim Kind = 4
)

// HasData reports whether the metablock's data block holds data (and is
// covered by the segment's data checksum).
func (k Kind) HasData() bool { return k == KindData || k == KindClean }

func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindClean:
		return "clean"
	case KindZero:
		return "zero"
	case KindTrim:
		return "trim"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Metablock describes data block i of a segment.
type Metablock struct {
	Block  uint64 // backing block number, in BlockSize units
	Mask   uint8  // bit i: sector i of the block is valid in this copy
	Kind   Kind
	Length uint32 // KindZero, KindTrim: number of blocks; otherwise 0
}

func (m Metablock) validate() error {
	switch m.Kind {
	case KindData:
		if m.Mask == 0 || m.Length != 0 {
			return fmt.Errorf("data metablock for block %d: mask %#02x, length %d (want mask != 0, length 0)", m.Block, m.Mask, m.Length)
		}
	case KindClean:
		if m.Mask != 0xFF || m.Length != 0 {
			return fmt.Errorf("clean metablock for block %d: mask %#02x, length %d (want mask 0xff, length 0)", m.Block, m.Mask, m.Length)
		}
	case KindZero, KindTrim:
		if m.Mask != 0 || m.Length == 0 || m.Block > math.MaxUint64-uint64(m.Length) {
			return fmt.Errorf("%v metablock for blocks [%d,+%d): mask %#02x (want mask 0, length >= 1, no overflow)", m.Kind, m.Block, m.Length, m.Mask)
		}
	default:
		return fmt.Errorf("metablock for block %d: unknown %v", m.Block, m.Kind)
	}
	return nil
}

func metablockOffset(i int) int { return SegmentHeaderSize + i*MetablockSize }

// PutMetablock writes metablock i in place into a segment header block.
// It panics if i is out of range (a programming error).
func PutMetablock(hdr []byte, i int, m Metablock) {
	if i < 0 || i >= MaxMetablocks {
		panic(fmt.Sprintf("layout: metablock index %d out of range [0,%d)", i, MaxMetablocks))
	}
	b := hdr[metablockOffset(i) : metablockOffset(i)+MetablockSize]
	binary.LittleEndian.PutUint64(b, m.Block)
	b[mbMask] = m.Mask
	b[mbKind] = uint8(m.Kind)
	b[mbReserved], b[mbReserved+1] = 0, 0
	binary.LittleEndian.PutUint32(b[mbLength:], m.Length)
}

// GetMetablock reads metablock i of a segment header block, unchecked. It
// panics if i is out of range (a programming error).
func GetMetablock(hdr []byte, i int) Metablock {
	if i < 0 || i >= MaxMetablocks {
		panic(fmt.Sprintf("layout: metablock index %d out of range [0,%d)", i, MaxMetablocks))
	}
	b := hdr[metablockOffset(i) : metablockOffset(i)+MetablockSize]
	return Metablock{
		Block:  binary.LittleEndian.Uint64(b),
		Mask:   b[mbMask],
		Kind:   Kind(b[mbKind]),
		Length: binary.LittleEndian.Uint32(b[mbLength:]),
	}
}

// SealSegmentHeader completes a header block whose first count metablocks
// are already in place (PutMetablock): it writes the magic and fixed
// fields, zeroes everything after the used metablocks and sets the header
// checksum. dataCRC is the data checksum (UpdateDataCRC) of the blocks of
// the metablocks whose kind HasData. It panics if hdr is shorter than
// BlockSize or count is out of range (programming errors).
func SealSegmentHeader(hdr []byte, id uint64, tag, epoch uint32, count int, dataCRC uint32) {
	hdr = hdr[:BlockSize]
	if count < 0 || count > MaxMetablocks {
		panic(fmt.Sprintf("layout: segment metablock count %d out of range [0,%d]", count, MaxMetablocks))
	}
	le := binary.LittleEndian
	copy(hdr, SegmentMagic)
	le.PutUint64(hdr[sgID:], id)
	le.PutUint32(hdr[sgTag:], tag)
	le.PutUint32(hdr[sgDataCRC:], dataCRC)
	le.PutUint16(hdr[sgCount:], uint16(count))
	le.PutUint16(hdr[sgFlags:], 0)
	le.PutUint32(hdr[sgEpoch:], epoch)
	end := metablockOffset(count)
	clear(hdr[end:])
	le.PutUint32(hdr[sgHeaderCRC:], crc(hdr[sgID:end]))
}

// SegmentHeader is a decoded segment header.
type SegmentHeader struct {
	ID         uint64
	Tag        uint32
	Epoch      uint32
	DataCRC    uint32
	Count      int
	Metablocks []Metablock // Count of them
	Copy       int         // which header copy it was read from (SegmentCandidates)
}

// ComputeDataCRC is the data checksum of the blocks h counts, taken from
// data, which holds the segment's data blocks in order (block i at
// i x BlockSize, as on the device after the header copy 0). Compare it
// with h.DataCRC.
func (h SegmentHeader) ComputeDataCRC(data []byte) uint32 {
	var c uint32
	for i, mb := range h.Metablocks {
		if mb.Kind.HasData() {
			c = UpdateDataCRC(c, data[i*BlockSize:(i+1)*BlockSize])
		}
	}
	return c
}

// SegmentCandidates decodes the two header copies of a slot (copy0 at the
// slot's first block, copy1 at its last) and returns those that are valid
// headers of segment id of the cache with this tag, best first: the newer
// epoch, then the higher count (the later write of the same run). The
// caller still checks the epoch against what the checkpoint allows and,
// for a segment not known durable, the data checksum, and falls back to
// the next candidate when the first fails. A nil or short copy counts as
// invalid.
func SegmentCandidates(copy0, copy1 []byte, id uint64, tag uint32, dataBlocks int) []SegmentHeader {
	var out []SegmentHeader
	for c, b := range [2][]byte{copy0, copy1} {
		h, err := DecodeSegmentHeader(b, dataBlocks)
		if err != nil || h.ID != id || h.Tag != tag {
			continue
		}
		h.Copy = c
		out = append(out, h)
	}
	if len(out) == 2 {
		a, b := out[0], out[1]
		if b.Epoch > a.Epoch || (b.Epoch == a.Epoch && b.Count > a.Count) {
			out[0], out[1] = b, a
		}
	}
	return out
}

// DecodeSegmentHeader decodes and checks a segment header block of a
// segment with dataBlocks data blocks: ErrInvalid for short input,
// ErrBlank for a never-written slot, ErrBadMagic, ErrChecksum for a torn
// or damaged header, ErrInvalid for inconsistent fields. It does not
// compare the id, tag or epoch with anything, nor check the data checksum:
// the caller knows what to expect and has the data.
//
// Bytes after the used metablocks are written as zeros but not checked:
// the header checksum does not cover them.
func DecodeSegmentHeader(b []byte, dataBlocks int) (SegmentHeader, error) {
	if len(b) < BlockSize {
		return SegmentHeader{}, fmt.Errorf("%w: segment header: %d bytes, need %d", ErrInvalid, len(b), BlockSize)
	}
	b = b[:BlockSize]
	le := binary.LittleEndian
	if string(b[:4]) != SegmentMagic {
		if allZero(b) {
			return SegmentHeader{}, fmt.Errorf("segment header: %w", ErrBlank)
		}
		return SegmentHeader{}, fmt.Errorf("segment header: %w (found %q, want %q)", ErrBadMagic, b[:4], SegmentMagic)
	}
	count := int(le.Uint16(b[sgCount:]))
	if count > MaxMetablocks {
		// Checked before the checksum, whose extent depends on it.
		return SegmentHeader{}, fmt.Errorf("%w: segment header: %d metablocks, at most %d fit", ErrInvalid, count, MaxMetablocks)
	}
	end := metablockOffset(count)
	if got, want := le.Uint32(b[sgHeaderCRC:]), crc(b[sgID:end]); got != want {
		return SegmentHeader{}, fmt.Errorf("segment header: %w (stored %#08x, computed %#08x)", ErrChecksum, got, want)
	}
	h := SegmentHeader{
		ID:      le.Uint64(b[sgID:]),
		Tag:     le.Uint32(b[sgTag:]),
		Epoch:   le.Uint32(b[sgEpoch:]),
		DataCRC: le.Uint32(b[sgDataCRC:]),
		Count:   count,
	}
	switch f := le.Uint16(b[sgFlags:]); {
	case f != 0:
		return SegmentHeader{}, fmt.Errorf("%w: segment %d: unknown flags %#x", ErrInvalid, h.ID, f)
	case h.ID == 0:
		return SegmentHeader{}, fmt.Errorf("%w: segment id 0 (ids start at 1)", ErrInvalid)
	case count > dataBlocks:
		return SegmentHeader{}, fmt.Errorf("%w: segment %d: %d metablocks, but segments have %d data blocks", ErrInvalid, h.ID, count, max(dataBlocks, 0))
	}
	h.Metablocks = make([]Metablock, count)
	for i := range h.Metablocks {
		m := GetMetablock(b, i)
		if err := m.validate(); err != nil {
			return SegmentHeader{}, fmt.Errorf("%w: segment %d: metablock %d: %v", ErrInvalid, h.ID, i, err)
		}
		if r := b[metablockOffset(i)+mbReserved:]; r[0] != 0 || r[1] != 0 {
			return SegmentHeader{}, fmt.Errorf("%w: segment %d: metablock %d: reserved bytes are not zero", ErrInvalid, h.ID, i)
		}
		h.Metablocks[i] = m
	}
	return h, nil
}
