package layout

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
)

// Sizes. They are part of the format: changing any of them changes where
// things are on every existing cache device.
const (
	BlockSize       = 4096 // unit of every structure and of caching
	SectorSize      = 512  // unit of the per-block valid mask
	SectorsPerBlock = BlockSize / SectorSize
)

// Format versions. Version only ever moves up: a new encoding gets a new
// number and the old ones stay readable until MinVersion is raised past
// them. A cache written by a version above Version is refused, never
// guessed at.
//
// Version 2 added the trim metablock (kind 4). A version 1 cache is
// upgraded (its superblock rewritten as version 2) when it is opened, before
// any segment is written, so a binary that knows only version 1 refuses it
// instead of ending the log at the first trim record it cannot read.
const (
	Version    = 2 // written by this code
	MinVersion = 1 // oldest version this code reads
)

// Device map.
var (
	// SuperblockOffsets are the two identical superblock copies.
	SuperblockOffsets = [2]int64{0, 4096}
	// CheckpointOffsets are the two checkpoint slots; record Seq lives in
	// slot Seq%2.
	CheckpointOffsets = [2]int64{8192, 12288}
)

const (
	// RingOffset is where the segment ring starts; everything before it
	// not listed in the device map is reserved and zero.
	RingOffset = 1 << 20

	DefaultSegmentSize = 512 << 10
	MinSegmentSize     = 16 << 10

	// SegmentHeaderSize is the fixed part of a segment header; the
	// metablocks follow it in the same block.
	SegmentHeaderSize = 32
	// MetablockSize is the size of one metablock.
	MetablockSize = 16
	// MaxMetablocks is how many metablocks fit in the header block, and so
	// the most data blocks a segment can have (254).
	MaxMetablocks = (BlockSize - SegmentHeaderSize) / MetablockSize
	// MaxSegmentSize is two header blocks plus MaxMetablocks data blocks.
	MaxSegmentSize = (2 + MaxMetablocks) * BlockSize

	// MinSegments is the smallest ring: one segment being written back
	// while the next one fills.
	MinSegments = 2
)

// Magic numbers, stored as these bytes at offset 0 of each structure.
const (
	SuperblockMagic = "WBOOSTSB"
	CheckpointMagic = "WBOOSTCP"
	SegmentMagic    = "WBSG"
)

// Decoding errors; test with errors.Is. Decoders wrap them with detail.
var (
	// ErrBlank: the structure is all zeros (never written).
	ErrBlank = errors.New("layout: blank (all zeros)")
	// ErrBadMagic: the structure holds something that is not ours.
	ErrBadMagic = errors.New("layout: bad magic: not writeboost data")
	// ErrChecksum: ours, but damaged (for example a torn write).
	ErrChecksum = errors.New("layout: checksum mismatch")
	// ErrNewerVersion: written by a newer writeboost in a format this one
	// cannot read.
	ErrNewerVersion = errors.New("layout: format version is newer than this writeboost supports")
	// ErrOlderVersion: written in a format older than this writeboost
	// still reads.
	ErrOlderVersion = errors.New("layout: format version is older than this writeboost supports")
	// ErrInvalid: checksum fine (or input too short) but the fields are
	// inconsistent.
	ErrInvalid = errors.New("layout: invalid")
	// ErrForeignUUID: a valid record that belongs to another cache.
	ErrForeignUUID = errors.New("layout: record belongs to another cache (UUID mismatch)")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// UpdateDataCRC adds one data block to a running segment data checksum,
// which starts at 0 (the checksum of no blocks). Blocks are added in
// metablock order, only for kinds that carry data.
func UpdateDataCRC(c uint32, block []byte) uint32 { return crc32.Update(c, castagnoli, block) }

// DataCRC is the data checksum of the given blocks, in order.
func DataCRC(blocks ...[]byte) uint32 {
	var c uint32
	for _, b := range blocks {
		c = UpdateDataCRC(c, b)
	}
	return c
}

// Tag is the cache tag stored in every segment header: the first 4 bytes
// of the cache UUID, so segments left by an earlier format of the same
// device are not taken for this cache's.
func Tag(uuid [16]byte) uint32 { return binary.LittleEndian.Uint32(uuid[:4]) }

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Geometry is where segments and their blocks are in the ring.
type Geometry struct {
	SegmentSize int
	NrSegments  uint64
}

// DataBlocks is the number of data blocks per segment: all its blocks but
// the two header copies.
func (g Geometry) DataBlocks() int { return g.SegmentSize/BlockSize - 2 }

// SlotOf is the ring slot of segment id (ids start at 1).
func (g Geometry) SlotOf(id uint64) uint64 { return (id - 1) % g.NrSegments }

// SegmentOffset is the byte offset of segment id's slot, where its header
// copy 0 is.
func (g Geometry) SegmentOffset(id uint64) int64 {
	return RingOffset + int64(g.SlotOf(id))*int64(g.SegmentSize)
}

// HeaderOffset is the byte offset of header copy c (0 or 1) of segment id:
// copy 0 is the slot's first block, copy 1 its last.
func (g Geometry) HeaderOffset(id uint64, c int) int64 {
	return g.SegmentOffset(id) + int64(c)*int64(g.SegmentSize-BlockSize)
}

// DataBlockOffset is the byte offset of data block i of segment id.
func (g Geometry) DataBlockOffset(id uint64, i int) int64 {
	return g.SegmentOffset(id) + int64(1+i)*BlockSize
}
