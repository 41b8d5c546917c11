package layout

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Checkpoint field offsets (see the package doc).
const (
	cpUUID          = 8
	cpSeq           = 24
	cpLastWriteback = 32
	cpLastFlushed   = 40
	cpFlags         = 48
	cpEpoch         = 52
	cpTime          = 56
	cpEnd           = 64

	cpFlagClean = 1 << 0
)

// Checkpoint records how far the log is written back and durable.
type Checkpoint struct {
	UUID [16]byte
	// Seq numbers the records from 1; record Seq is written to slot Seq%2.
	Seq uint64
	// LastWritebackID: every segment with id <= this is written back to
	// the backing device and the backing device was flushed.
	LastWritebackID uint64
	// LastFlushedID: every segment with id <= this was durable on the
	// cache device when this record was written. It may be below
	// LastWritebackID (written back before a cache flush), except in a
	// Clean record.
	LastFlushedID uint64
	// Clean: written at a clean shutdown; the log ends exactly at
	// LastFlushedID.
	Clean bool
	// Epoch is the run of the cache that wrote this record; the segments
	// of that run carry it too.
	Epoch uint32
	Time  int64 // unix nanoseconds
}

// Slot is the index in CheckpointOffsets that record c goes to.
func (c *Checkpoint) Slot() int { return int(c.Seq % 2) }

// Encode writes c as a full block into b[:BlockSize]. It panics if b is
// shorter than BlockSize.
func (c *Checkpoint) Encode(b []byte) {
	b = b[:BlockSize]
	clear(b)
	le := binary.LittleEndian
	copy(b, CheckpointMagic)
	copy(b[cpUUID:], c.UUID[:])
	le.PutUint64(b[cpSeq:], c.Seq)
	le.PutUint64(b[cpLastWriteback:], c.LastWritebackID)
	le.PutUint64(b[cpLastFlushed:], c.LastFlushedID)
	var flags uint32
	if c.Clean {
		flags |= cpFlagClean
	}
	le.PutUint32(b[cpFlags:], flags)
	le.PutUint32(b[cpEpoch:], c.Epoch)
	le.PutUint64(b[cpTime:], uint64(c.Time))
	le.PutUint32(b[blockCRC:], crc(b[:blockCRC]))
}

// DecodeCheckpoint decodes one checkpoint slot: ErrInvalid for short
// input, ErrBlank, ErrBadMagic, ErrChecksum, then ErrInvalid for
// inconsistent fields. It does not check the UUID (ChooseCheckpoint does).
func DecodeCheckpoint(b []byte) (Checkpoint, error) {
	if len(b) < BlockSize {
		return Checkpoint{}, fmt.Errorf("%w: checkpoint: %d bytes, need %d", ErrInvalid, len(b), BlockSize)
	}
	b = b[:BlockSize]
	if allZero(b) {
		return Checkpoint{}, fmt.Errorf("checkpoint: %w", ErrBlank)
	}
	if string(b[:8]) != CheckpointMagic {
		return Checkpoint{}, fmt.Errorf("checkpoint: %w (found %q, want %q)", ErrBadMagic, b[:8], CheckpointMagic)
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[blockCRC:]), crc(b[:blockCRC]); got != want {
		return Checkpoint{}, fmt.Errorf("checkpoint: %w (stored %#08x, computed %#08x)", ErrChecksum, got, want)
	}
	var c Checkpoint
	copy(c.UUID[:], b[cpUUID:])
	c.Seq = le.Uint64(b[cpSeq:])
	c.LastWritebackID = le.Uint64(b[cpLastWriteback:])
	c.LastFlushedID = le.Uint64(b[cpLastFlushed:])
	flags := le.Uint32(b[cpFlags:])
	c.Clean = flags&cpFlagClean != 0
	c.Epoch = le.Uint32(b[cpEpoch:])
	c.Time = int64(le.Uint64(b[cpTime:]))
	switch {
	case flags&^cpFlagClean != 0:
		return Checkpoint{}, fmt.Errorf("%w: checkpoint: unknown flags %#x", ErrInvalid, flags&^cpFlagClean)
	case !allZero(b[cpEnd:blockCRC]):
		return Checkpoint{}, fmt.Errorf("%w: checkpoint: reserved bytes are not zero", ErrInvalid)
	case c.Seq == 0:
		return Checkpoint{}, fmt.Errorf("%w: checkpoint: sequence 0 (records are numbered from 1)", ErrInvalid)
	case c.Clean && c.LastWritebackID > c.LastFlushedID:
		// The log of a clean shutdown ends at LastFlushedID: nothing after
		// it can have been written back. (Otherwise a segment may be
		// written back, and the backing flushed, before a cache flush
		// makes it durable on the cache device.)
		return Checkpoint{}, fmt.Errorf("%w: checkpoint: clean shutdown with the log ending at segment %d, but segments up to %d written back",
			ErrInvalid, c.LastFlushedID, c.LastWritebackID)
	}
	return c, nil
}

// ChooseCheckpoint decodes the two slots (a = slot 0, b = slot 1) and
// returns the valid record of cache uuid with the higher Seq. A record of
// another cache, or in the wrong slot for its Seq, counts as invalid.
//
// A fresh cache has no record: both slots blank give Checkpoint{UUID:
// uuid} and no error. So does a blank slot 0 next to a damaged slot 1:
// records are numbered from 1 and each is durable before the next is
// written, so a blank slot 0 means record 2 was never completed, and the
// damage is the first record (in slot 1) torn by a crash, before which
// the cache was fresh.
//
// With no valid record the error is ErrForeignUUID if the only records
// present belong to another cache, ErrBadMagic if both slots are foreign
// data (or one blank), otherwise ErrChecksum or ErrInvalid.
func ChooseCheckpoint(a, b []byte, uuid [16]byte) (Checkpoint, error) {
	var (
		c   [2]Checkpoint
		err [2]error
	)
	for i, buf := range [2][]byte{a, b} {
		c[i], err[i] = DecodeCheckpoint(buf)
		switch {
		case err[i] != nil:
		case c[i].UUID != uuid:
			err[i] = fmt.Errorf("checkpoint %d: %w (record of %x, want %x)", c[i].Seq, ErrForeignUUID, c[i].UUID, uuid)
		case c[i].Slot() != i:
			err[i] = fmt.Errorf("%w: checkpoint %d found in slot %d, belongs in slot %d", ErrInvalid, c[i].Seq, i, c[i].Slot())
		}
	}
	switch {
	case err[0] == nil && err[1] == nil:
		if c[1].Seq > c[0].Seq {
			return c[1], nil
		}
		return c[0], nil
	case err[0] == nil:
		return c[0], nil
	case err[1] == nil:
		return c[1], nil
	case errors.Is(err[0], ErrBlank) && (errors.Is(err[1], ErrBlank) || errors.Is(err[1], ErrChecksum) || errors.Is(err[1], ErrBadMagic)):
		return Checkpoint{UUID: uuid}, nil
	}
	return Checkpoint{}, pickError("checkpoint", err[0], err[1])
}
