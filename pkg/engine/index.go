package engine

import "math/bits"

// The index maps a backing block number to the cache position holding its
// newest copy. It is sized once, for the cache's capacity, and costs about
// 13 bytes per cache block (dm-writeboost spends about 40):
//
//   - meta: one uint64 per cache position (segment slot * data blocks +
//     block index), packing the backing block number, the sector mask and
//     flags. It doubles as the reverse map that writeback and slot reuse
//     need, so the hash table stores no keys.
//   - table: an open-addressing hash table (linear probing, backward-shift
//     deletion) of uint32 slots holding position+1 (0 = empty), sized for a
//     load factor of at most 0.8.
//
// It is a plain data structure: the engine serialises access under its mutex.

const (
	metaBlockBits = 48
	metaBlockMask = 1<<metaBlockBits - 1
	metaMaskShift = 48
	metaFlagShift = 56

	flagValid   = 1 << 0 // position is in the index (newest copy of its block)
	flagDirty   = 1 << 1 // sectors in the mask are not yet on the backing device
	flagDiscard = 1 << 2 // a discard record; never in the index
)

// maxBackingBlock bounds backing block numbers to what meta can hold
// (2^48 blocks of 4 KiB = 1 EiB).
const maxBackingBlock = metaBlockMask

func packMeta(block uint64, mask uint8, flags uint8) uint64 {
	return block&metaBlockMask | uint64(mask)<<metaMaskShift | uint64(flags)<<metaFlagShift
}

func metaBlock(m uint64) uint64 { return m & metaBlockMask }
func metaMask(m uint64) uint8   { return uint8(m >> metaMaskShift) }
func metaFlags(m uint64) uint8  { return uint8(m >> metaFlagShift) }

type index struct {
	meta  []uint64
	table []uint32
	n     int // entries in table
}

func newIndex(positions int) *index {
	size := positions + positions/4 + 1 // load factor <= 0.8
	return &index{meta: make([]uint64, positions), table: make([]uint32, size)}
}

// bytes is the memory the index holds.
func (x *index) bytes() int { return len(x.meta)*8 + len(x.table)*4 }

func (x *index) home(block uint64) int {
	// Fibonacci hashing spreads sequential block numbers; the multiply-high
	// maps the hash onto a table of any size without a modulo.
	h := block * 0x9E3779B97F4A7C15
	hi, _ := bits.Mul64(h, uint64(len(x.table)))
	return int(hi)
}

// lookup returns the position holding block.
func (x *index) lookup(block uint64) (uint32, bool) {
	i := x.home(block)
	for {
		v := x.table[i]
		if v == 0 {
			return 0, false
		}
		if metaBlock(x.meta[v-1]) == block {
			return v - 1, true
		}
		if i++; i == len(x.table) {
			i = 0
		}
	}
}

// insert records pos as the copy of block held in meta[pos] (already set,
// with flagValid). It replaces any previous position for the same block and
// returns it.
func (x *index) insert(pos uint32) (old uint32, replaced bool) {
	block := metaBlock(x.meta[pos])
	i := x.home(block)
	for {
		v := x.table[i]
		if v == 0 {
			x.table[i] = pos + 1
			x.n++
			return 0, false
		}
		if metaBlock(x.meta[v-1]) == block {
			x.table[i] = pos + 1
			return v - 1, true
		}
		if i++; i == len(x.table) {
			i = 0
		}
	}
}

// remove deletes block's entry if it points at pos.
func (x *index) remove(block uint64, pos uint32) bool {
	i := x.home(block)
	for {
		v := x.table[i]
		if v == 0 {
			return false
		}
		if v-1 == pos {
			break
		}
		if i++; i == len(x.table) {
			i = 0
		}
	}
	// Backward-shift deletion keeps every probe chain intact without
	// tombstones.
	x.n--
	j := i
	for {
		x.table[i] = 0
		for {
			if j++; j == len(x.table) {
				j = 0
			}
			v := x.table[j]
			if v == 0 {
				return true
			}
			h := x.home(metaBlock(x.meta[v-1]))
			// Move v back to the hole at i unless its home lies cyclically
			// in (i, j].
			if i <= j {
				if i < h && h <= j {
					continue
				}
			} else if i < h || h <= j {
				continue
			}
			x.table[i] = v
			i = j
			break
		}
	}
}
