package layout

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Superblock field offsets (see the package doc).
const (
	sbVersion     = 8
	sbFlags       = 12
	sbUUID        = 16
	sbSeq         = 32
	sbBlockSize   = 40
	sbSegmentSize = 44
	sbCacheSize   = 48
	sbBackingSize = 56
	sbRingOffset  = 64
	sbNrSegments  = 72
	sbCreated     = 80
	sbEnd         = 88 // first reserved byte
	blockCRC      = BlockSize - 4
)

// Superblock describes a cache: its identity and geometry.
type Superblock struct {
	Version     uint32
	UUID        [16]byte
	Seq         uint64 // bumped on each rewrite; the newer valid copy wins
	BlockSize   uint32
	SegmentSize uint32
	CacheSize   uint64 // cache device size it was formatted for
	BackingSize uint64
	RingOffset  uint64
	NrSegments  uint64
	Created     int64 // unix nanoseconds
}

// NewSuperblock lays out a fresh cache (Seq 1) on a cache device of
// cacheSize bytes for a backing device of backingSize bytes.
func NewSuperblock(cacheSize, backingSize int64, segmentSize int, uuid [16]byte, now int64) (Superblock, error) {
	switch {
	case segmentSize < MinSegmentSize || segmentSize > MaxSegmentSize || segmentSize%BlockSize != 0:
		return Superblock{}, fmt.Errorf("%w: segment size %d: want a multiple of %d between %d and %d",
			ErrInvalid, segmentSize, BlockSize, MinSegmentSize, MaxSegmentSize)
	case backingSize <= 0 || backingSize%BlockSize != 0:
		return Superblock{}, fmt.Errorf("%w: backing size %d: want a positive multiple of %d", ErrInvalid, backingSize, BlockSize)
	case cacheSize < RingOffset+MinSegments*int64(segmentSize):
		return Superblock{}, fmt.Errorf("%w: cache device of %d bytes is too small: need %d bytes (1 MiB of metadata and %d segments of %d bytes)",
			ErrInvalid, cacheSize, RingOffset+MinSegments*int64(segmentSize), MinSegments, segmentSize)
	}
	s := Superblock{
		Version:     Version,
		UUID:        uuid,
		Seq:         1,
		BlockSize:   BlockSize,
		SegmentSize: uint32(segmentSize),
		CacheSize:   uint64(cacheSize),
		BackingSize: uint64(backingSize),
		RingOffset:  RingOffset,
		NrSegments:  uint64((cacheSize - RingOffset) / int64(segmentSize)),
		Created:     now,
	}
	if err := s.validate(); err != nil {
		return Superblock{}, err
	}
	return s, nil
}

// Geometry of the segment ring.
func (s Superblock) Geometry() Geometry {
	return Geometry{SegmentSize: int(s.SegmentSize), NrSegments: s.NrSegments}
}

// Encode writes s as a full block into b[:BlockSize], reserved bytes
// zeroed. A zero Version encodes as the current Version. It panics if b is
// shorter than BlockSize (a programming error, as in encoding/binary).
func (s *Superblock) Encode(b []byte) {
	b = b[:BlockSize]
	clear(b)
	le := binary.LittleEndian
	copy(b, SuperblockMagic)
	v := s.Version
	if v == 0 {
		v = Version
	}
	le.PutUint32(b[sbVersion:], v)
	le.PutUint32(b[sbFlags:], 0)
	copy(b[sbUUID:], s.UUID[:])
	le.PutUint64(b[sbSeq:], s.Seq)
	le.PutUint32(b[sbBlockSize:], s.BlockSize)
	le.PutUint32(b[sbSegmentSize:], s.SegmentSize)
	le.PutUint64(b[sbCacheSize:], s.CacheSize)
	le.PutUint64(b[sbBackingSize:], s.BackingSize)
	le.PutUint64(b[sbRingOffset:], s.RingOffset)
	le.PutUint64(b[sbNrSegments:], s.NrSegments)
	le.PutUint64(b[sbCreated:], uint64(s.Created))
	le.PutUint32(b[blockCRC:], crc(b[:blockCRC]))
}

// DecodeSuperblock decodes one superblock copy. It checks, in order: length
// (ErrInvalid), all zeros (ErrBlank), magic (ErrBadMagic), checksum
// (ErrChecksum), version (ErrNewerVersion, ErrOlderVersion), then the
// fields (ErrInvalid). The magic, the version and the checksum stay at
// the same offsets in every version, so any version can be recognised.
func DecodeSuperblock(b []byte) (Superblock, error) {
	if len(b) < BlockSize {
		return Superblock{}, fmt.Errorf("%w: superblock: %d bytes, need %d", ErrInvalid, len(b), BlockSize)
	}
	b = b[:BlockSize]
	if allZero(b) {
		return Superblock{}, fmt.Errorf("superblock: %w", ErrBlank)
	}
	if string(b[:8]) != SuperblockMagic {
		return Superblock{}, fmt.Errorf("superblock: %w (found %q, want %q)", ErrBadMagic, b[:8], SuperblockMagic)
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[blockCRC:]), crc(b[:blockCRC]); got != want {
		return Superblock{}, fmt.Errorf("superblock: %w (stored %#08x, computed %#08x)", ErrChecksum, got, want)
	}
	s := Superblock{Version: le.Uint32(b[sbVersion:])}
	switch {
	case s.Version > Version:
		return Superblock{}, fmt.Errorf("%w: the cache is in format version %d, written by a newer writeboost; this one reads versions %d to %d",
			ErrNewerVersion, s.Version, MinVersion, Version)
	case s.Version < MinVersion:
		return Superblock{}, fmt.Errorf("%w: the cache is in format version %d; this writeboost reads versions %d to %d",
			ErrOlderVersion, s.Version, MinVersion, Version)
	}
	if f := le.Uint32(b[sbFlags:]); f != 0 {
		return Superblock{}, fmt.Errorf("%w: superblock: unknown flags %#x", ErrInvalid, f)
	}
	if !allZero(b[sbEnd:blockCRC]) {
		return Superblock{}, fmt.Errorf("%w: superblock: reserved bytes are not zero", ErrInvalid)
	}
	copy(s.UUID[:], b[sbUUID:])
	s.Seq = le.Uint64(b[sbSeq:])
	s.BlockSize = le.Uint32(b[sbBlockSize:])
	s.SegmentSize = le.Uint32(b[sbSegmentSize:])
	s.CacheSize = le.Uint64(b[sbCacheSize:])
	s.BackingSize = le.Uint64(b[sbBackingSize:])
	s.RingOffset = le.Uint64(b[sbRingOffset:])
	s.NrSegments = le.Uint64(b[sbNrSegments:])
	s.Created = int64(le.Uint64(b[sbCreated:]))
	if err := s.validate(); err != nil {
		return Superblock{}, err
	}
	return s, nil
}

// validate checks the geometry fields for consistency.
func (s *Superblock) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: superblock: "+format, append([]any{ErrInvalid}, a...)...)
	}
	switch {
	case s.BlockSize != BlockSize:
		return bad("block size %d, want %d", s.BlockSize, BlockSize)
	case s.SegmentSize < MinSegmentSize || s.SegmentSize > MaxSegmentSize || s.SegmentSize%BlockSize != 0:
		return bad("segment size %d: want a multiple of %d between %d and %d", s.SegmentSize, BlockSize, MinSegmentSize, MaxSegmentSize)
	case s.RingOffset != RingOffset:
		return bad("ring offset %d, want %d", s.RingOffset, RingOffset)
	case s.NrSegments < MinSegments:
		return bad("%d segments, want at least %d", s.NrSegments, MinSegments)
	// Overflow-safe form of RingOffset + NrSegments*SegmentSize > CacheSize.
	case s.CacheSize < RingOffset || (s.CacheSize-RingOffset)/uint64(s.SegmentSize) < s.NrSegments:
		return bad("a ring of %d segments of %d bytes does not fit in a cache device of %d bytes", s.NrSegments, s.SegmentSize, s.CacheSize)
	case s.CacheSize > 1<<63-1 || s.BackingSize > 1<<63-1:
		return bad("device size out of range (cache %d, backing %d)", s.CacheSize, s.BackingSize)
	case s.BackingSize == 0 || s.BackingSize%BlockSize != 0:
		return bad("backing size %d: want a positive multiple of %d", s.BackingSize, BlockSize)
	}
	return nil
}

// ChooseSuperblock decodes the two copies and returns the valid one with
// the higher Seq, so a torn copy never loses the superblock. If neither is
// valid the error is the most telling: ErrNewerVersion or ErrOlderVersion
// if either copy says so; ErrBlank if both are blank; ErrBadMagic if both
// are blank or foreign (and not both blank); otherwise the damage
// (ErrChecksum or ErrInvalid). Two valid copies of different caches (a
// format that did not finish) are refused with ErrInvalid.
func ChooseSuperblock(a, b []byte) (Superblock, error) {
	sa, ea := DecodeSuperblock(a)
	sb, eb := DecodeSuperblock(b)
	switch {
	case ea == nil && eb == nil:
		if sa.UUID != sb.UUID {
			return Superblock{}, fmt.Errorf("%w: the two superblock copies belong to different caches (%x, %x): an interrupted format?",
				ErrInvalid, sa.UUID, sb.UUID)
		}
		if sb.Seq > sa.Seq {
			return sb, nil
		}
		return sa, nil
	case ea == nil:
		return sa, nil
	case eb == nil:
		return sb, nil
	}
	return Superblock{}, pickError("superblock", ea, eb)
}

// pickError returns the more telling of the errors of two damaged copies,
// wrapping its sentinel and quoting both.
func pickError(what string, ea, eb error) error {
	both := func(target error) bool { return errors.Is(ea, target) && errors.Is(eb, target) }
	foreignOrBlank := func(err error) bool { return errors.Is(err, ErrBadMagic) || errors.Is(err, ErrBlank) }
	var sentinel error
	switch {
	case errors.Is(ea, ErrNewerVersion) || errors.Is(eb, ErrNewerVersion):
		sentinel = ErrNewerVersion
	case errors.Is(ea, ErrOlderVersion) || errors.Is(eb, ErrOlderVersion):
		sentinel = ErrOlderVersion
	case both(ErrBlank):
		sentinel = ErrBlank
	case foreignOrBlank(ea) && foreignOrBlank(eb):
		sentinel = ErrBadMagic
	case errors.Is(ea, ErrForeignUUID) || errors.Is(eb, ErrForeignUUID):
		if foreignOrBlank(ea) || foreignOrBlank(eb) || both(ErrForeignUUID) {
			sentinel = ErrForeignUUID
			break
		}
		fallthrough
	default:
		// Some copy is ours but damaged; report the damage.
		for _, s := range []error{ErrChecksum, ErrInvalid} {
			if errors.Is(ea, s) || errors.Is(eb, s) {
				sentinel = s
				break
			}
		}
		if sentinel == nil {
			sentinel = ErrInvalid
		}
	}
	return fmt.Errorf("%w: no valid %s copy: copy 0: %v; copy 1: %v", sentinel, what, ea, eb)
}
