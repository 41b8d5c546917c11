// Package layout specifies and encodes the on-disk format of a writeboost
// cache device: the superblock, the checkpoint records and the segments of
// the log. It does no I/O; pkg/engine reads and writes the blocks and
// uses this package to build and check them.
//
// The format is the contract between every writeboost binary that will
// ever open a cache, so:
//
//   - The constants of this package (sizes, offsets, magics, kinds) are
//     part of the format. Changing one changes the format.
//   - Encodings are only ever appended: a new field takes reserved (zero)
//     bytes, a new metablock kind takes a new number, and the format
//     version goes up. Bytes that are reserved in a version must be zero,
//     and a decoder refuses non-zero reserved bytes and unknown flags and
//     kinds, so data of a newer format is never misread.
//   - The version only moves up. This code writes Version and reads
//     MinVersion to Version; a cache from a newer writeboost is refused
//     (ErrNewerVersion) rather than guessed at. The magic, the version
//     and the checksum of the superblock keep their offsets in every
//     version, so any version can be recognised.
//   - Every structure carries a magic and a CRC-32C (Castagnoli), and
//     identifies its cache: the superblock holds a random UUID, the
//     checkpoints the UUID, segments the first 4 bytes of it (Tag), so a
//     device holding something else, or left over from an earlier format,
//     is refused. The decoders tell a never-written block (ErrBlank) from
//     foreign data (ErrBadMagic) and from damage (ErrChecksum, ErrInvalid).
//
// All integers are little-endian. Sizes and offsets are in bytes unless
// said otherwise. Decoders never panic on any input.
//
// # Device map
//
//	| offset         | size          | content                                  |
//	|----------------|---------------|------------------------------------------|
//	| 0              | 4096          | superblock, copy 0                       |
//	| 4096           | 4096          | superblock, copy 1 (identical)           |
//	| 8192           | 4096          | checkpoint slot 0 (even sequences)       |
//	| 12288          | 4096          | checkpoint slot 1 (odd sequences)        |
//	| 16384          | up to 1 MiB   | reserved, zero                           |
//	| 1 MiB          | n x seg size  | segment ring: n = (cache size - 1 MiB) / |
//	|                |               | segment size slots                       |
//	| after the ring | rest          | unused                                   |
//
// # Superblock
//
// The superblock names the cache and fixes its geometry. Two identical
// copies are written one after the other, each made durable before the
// next, so a torn write can damage only one; the valid copy with the
// higher sequence wins (ChooseSuperblock). Sequence bumps only when the
// superblock is rewritten: when the backing device grows (offline at open,
// or live: the size of the backing device field is the only one that
// changes, and only upward; pkg/engine's grow.go), or when the format
// version is raised.
//
//	| off  | size | field                                                 |
//	|------|------|-------------------------------------------------------|
//	| 0    | 8    | magic "WBOOSTSB"                                      |
//	| 8    | 4    | format version                                        |
//	| 12   | 4    | flags, 0 in v1 (unknown bits are refused)             |
//	| 16   | 16   | UUID of this cache                                    |
//	| 32   | 8    | sequence, bumped on each rewrite                      |
//	| 40   | 4    | block size: 4096                                      |
//	| 44   | 4    | segment size: a multiple of 4096 in [16 KiB, MaxSegmentSize] |
//	| 48   | 8    | size of the cache device it was formatted for         |
//	| 56   | 8    | size of the backing device, a positive multiple of 4096 |
//	| 64   | 8    | ring offset: 1 MiB                                    |
//	| 72   | 8    | number of segments in the ring, >= 2, fitting the cache size |
//	| 80   | 8    | creation time, unix nanoseconds                       |
//	| 88   | 4004 | reserved, zero                                        |
//	| 4092 | 4    | CRC-32C of bytes [0, 4092)                            |
//
// # Checkpoint
//
// A checkpoint record says how far the log is written back and how far it
// was durable, so an open need not read the whole device. Records are
// numbered from 1; record Seq goes to slot Seq%2 and is made durable
// before record Seq+1 is written, so the previous record survives a torn
// write. The valid record of this cache with the highest sequence wins
// (ChooseCheckpoint). A fresh cache has none: both slots blank, or slot 0
// blank and slot 1 damaged (record 1 torn; had record 1 been complete,
// record 2 would be in slot 0). Formatting zeroes both slots.
//
// A dirty block is superseded by a newer write of the same block or by a
// cleaned copy: the cleaner copies a segment's live dirty blocks forward
// into the head of the log as ordinary data metablocks, so that the
// segment can be passed without writing back (pkg/engine's clean.go).
// Both kinds of copy are in segments after last_writeback_id, which
// recovery replays; nothing in the encoding tells them apart, and none is
// needed: format version 1 covers caches that were cleaned.
//
// The epoch numbers the runs (opens) of the cache: a run records its
// epoch in a checkpoint before it writes any segment, and stamps it on
// every segment it writes.
//
//	| off  | size | field                                                 |
//	|------|------|-------------------------------------------------------|
//	| 0    | 8    | magic "WBOOSTCP"                                      |
//	| 8    | 16   | cache UUID                                            |
//	| 24   | 8    | sequence, >= 1                                        |
//	| 32   | 8    | last_writeback_id: every segment with id <= this is passed: each of its dirty blocks is written back to the backing device (and the backing device was flushed), or superseded by a copy in a later segment that was durable when this record was written (see below) |
//	| 40   | 8    | last_flushed_id: every segment with id <= this was durable on the cache device when this record was written (may be below last_writeback_id, except when clean) |
//	| 48   | 4    | flags: bit 0 = clean shutdown (the log ends exactly at last_flushed_id, and last_writeback_id <= last_flushed_id); other bits 0 |
//	| 52   | 4    | epoch: the run (open) of the cache that wrote this record |
//	| 56   | 8    | time written, unix nanoseconds                        |
//	| 64   | 4028 | reserved, zero                                        |
//	| 4092 | 4    | CRC-32C of bytes [0, 4092)                            |
//
// # Segments
//
// The log is a ring of segments. A segment is SegmentSize bytes: header
// copy 0 (the first block), SegmentSize/4096 - 2 data blocks, header copy
// 1 (the last block). Segment ids start at 1 and go up by one per segment
// (0 = never written); segment id lives in slot (id-1) % n at offset
// 1 MiB + slot x segment size, and its data block i at that offset +
// (1+i) x 4096, described by metablock i.
//
// A segment may be written more than once while it fills: a flush that
// finds the segment in RAM part-full writes its new data blocks and a
// header counting the metablocks so far, and the segment keeps filling
// (dm-writeboost instead closes the segment at every flush, so a
// fsync-heavy load spends a whole segment per fsync). Each write of a
// segment writes only data blocks not written before, then a complete
// header into one copy, the copies alternating and copy 0 first. A data
// block, once written, never changes, and a copy is rewritten only after
// the other copy's last write is durable; so a torn write can spoil only
// the copy being written, and the other copy still describes everything
// the last completed flush covered. The two copies agree on their common
// prefix of metablocks.
//
// The header checksum covers the header and its metablocks, the data
// checksum the data blocks the header counts, so a torn write (the end of
// the log after a crash) is recognised. The tag (32 bits of the UUID)
// refuses segments of an earlier format of the same device; the segment
// id expected at the slot, the epoch and the checksums are further
// checks. Of the valid copies of the expected id, a reader takes the one
// with the newer epoch, then the higher count (SegmentCandidates), and
// falls back to the other if the data checksum of the first fails. The
// epoch (the run of the cache that wrote the segment, recorded in the
// checkpoint too) lets recovery refuse a stale segment or copy beyond the
// end of a log it recovered earlier: a segment beyond last_flushed_id
// must carry the epoch of the newest checkpoint. DecodeSegmentHeader
// checks a header on its own; comparing the id, tag and epoch with what
// the ring position calls for, and the data checksum, is the reader's
// part.
//
// Header block: the fixed header, then count metablocks, then zeros.
//
//	| off | size    | field                                               |
//	|-----|---------|-----------------------------------------------------|
//	| 0   | 4       | magic "WBSG"                                        |
//	| 4   | 4       | header CRC-32C of bytes [8, 32 + 16 x count)        |
//	| 8   | 8       | segment id, >= 1                                    |
//	| 16  | 4       | cache tag: the first 4 bytes of the cache UUID      |
//	| 20  | 4       | epoch: the run (open) of the cache that wrote it    |
//	| 24  | 4       | data CRC-32C of the data blocks of the metablocks whose kind carries data (data, clean), in metablock order, each a full 4096-byte block; of no blocks: 0 |
//	| 28  | 2       | count of metablocks used, <= data blocks per segment |
//	| 30  | 2       | flags, 0 in v1 (others refused)                     |
//	| 32  | 16 x count | metablocks                                       |
//	| ... | to 4096 | zero (written so; not covered by the checksum, not checked) |
//
// At most MaxMetablocks = (4096 - 32) / 16 = 254 metablocks fit, so a
// segment has at most 254 data blocks: MaxSegmentSize = 256 x 4096. The
// default 512 KiB segment has 126.
//
// Metablock:
//
//	| off | size | field                                                  |
//	|-----|------|--------------------------------------------------------|
//	| 0   | 8    | backing block number, in 4096-byte blocks              |
//	| 8   | 1    | sector mask: bit i set = 512-byte sector i of the block is valid in this copy |
//	| 9   | 1    | kind, below                                            |
//	| 10  | 2    | reserved, zero                                         |
//	| 12  | 4    | length in blocks (zero, trim: >= 1; others: 0)         |
//
// Kinds:
//
//	| kind | name    | meaning                                                  | mask    | data block |
//	|------|---------|----------------------------------------------------------|---------|------------|
//	| 1    | data    | dirty sectors of the block, per mask                     | != 0    | yes        |
//	| 2    | clean   | read-cache copy of the whole block, equal to the backing | 0xFF    | yes        |
//	| 3    | zero    | blocks [block, block+length) read as zeros from here on  | 0       | no (unused) |
//	| 4    | trim    | blocks [block, block+length) unspecified from here on (v2) | 0     | no (unused) |
//
// A zero or trim record kills every copy of its blocks in earlier
// segments (and earlier entries of its own segment); later copies win.
// Recovery replays the records in log order, so the contents after a
// crash are those of a prefix of the log, as for data.
//
// Zero (WRITE_ZEROES) must read back as zeros, after any crash too, but
// costs the request nothing: the record itself makes the range read as
// zeros. The backing device is zeroed later, by the writeback of the
// record's segment, in sorted runs, without deallocating (a pool that
// promised space keeps it), and flushed before a checkpoint passes the
// segment: until then recovery finds the record again and writeback zeroes
// the range again. Copies of the range in later segments are written back
// after the zeroing, so they win on the backing device too.
//
// Trim (TRIM) makes the contents unspecified until written again (the NBD
// and the kernel's contract for discard). The record only keeps crash
// recovery from resurrecting copies older than the trim, so that what a
// volume reads after a crash is what it read before; the backing device
// owes nothing. The engine may pass the discard down to a thin-provisioned
// backing device where its pool asks for it.
//
// Version 1 had no trim record; its kind 3 was written for both requests
// (the backing device zeroed before the record), which the version 2
// semantics of kind 3 read correctly.
package layout
