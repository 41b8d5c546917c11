package inspect

import (
	"fmt"
	"io"
	"time"
)

// WriteText prints the report for a human: the superblock, the
// checkpoint, the log and a verdict.
func (r *Report) WriteText(w io.Writer) {
	if sb := r.Superblock; sb != nil {
		fmt.Fprintf(w, "superblock: version %d, uuid %s, seq %d, created %s\n", sb.Version, r.UUID, sb.Seq,
			time.Unix(0, sb.Created).UTC().Format(time.RFC3339))
		fmt.Fprintf(w, "  cache size %d, backing size %d, segment size %d, %d segments\n",
			sb.CacheSize, sb.BackingSize, sb.SegmentSize, sb.NrSegments)
	}
	for i, c := range r.Superblocks {
		fmt.Fprintf(w, "  copy %d at %d: %s\n", i, c.Offset, copyState(c))
	}
	if ck := r.Checkpoint; ck != nil {
		fmt.Fprintf(w, "checkpoint: seq %d, epoch %d, last_writeback_id %d, last_flushed_id %d, clean shutdown: %s\n",
			ck.Seq, ck.Epoch, ck.LastWritebackID, ck.LastFlushedID, yesNo(ck.Clean))
	}
	for i, c := range r.Checkpoints {
		fmt.Fprintf(w, "  slot %d at %d: %s\n", i, c.Offset, copyState(c))
	}
	valid := 0
	for _, s := range r.Live {
		if s.Problem == "" {
			valid++
		}
	}
	if r.Checkpoint != nil {
		fmt.Fprintf(w, "log: %d live segments valid (ids %d..%d), last id %d, %d dirty blocks\n",
			valid, r.Checkpoint.LastWritebackID+1, r.LastID, r.LastID, r.DirtyBlocks)
		fmt.Fprintf(w, "other slots: %d written back, %d never written, %d other (older laps, other caches)\n",
			r.WrittenBackSlots, r.BlankSlots, r.OtherSlots)
	}
	if r.Tail != nil {
		fmt.Fprintf(w, "torn tail: segment %d (slot %d) was being written at an unclean shutdown (%s); recovery drops it\n",
			r.Tail.ID, r.Tail.Slot, r.Tail.Problem)
	}
	if !r.Corrupt() {
		fmt.Fprintln(w, "result: OK")
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "CORRUPT: %s\n", p)
	}
	fmt.Fprintf(w, "result: %d problem(s) found\n", len(r.Problems))
}

// WriteSegmentText prints one segment with its metablocks.
func WriteSegmentText(w io.Writer, s SegmentReport) {
	fmt.Fprintf(w, "segment %d: slot %d, offset %d, epoch %d, %d metablocks (%d data, %d discard), header ok: %s, data checksum ok: %s\n",
		s.ID, s.Slot, s.Offset, s.Epoch, s.Count, s.DataBlocks, s.Discards, yesNo(s.HeaderOK), yesNo(s.DataCRCOK))
	if s.Problem != "" {
		fmt.Fprintf(w, "  problem: %s\n", s.Problem)
	}
	for _, m := range s.Metablocks {
		if m.Kind == "discard" {
			fmt.Fprintf(w, "  [%4d] %-7s blocks %d..%d\n", m.Index, m.Kind, m.Block, m.Block+uint64(m.Length)-1)
			continue
		}
		fmt.Fprintf(w, "  [%4d] %-7s block %d mask %s\n", m.Index, m.Kind, m.Block, m.Mask)
	}
}

func copyState(c CopyReport) string {
	if c.Valid {
		return fmt.Sprintf("valid (seq %d)", c.Seq)
	}
	return "INVALID: " + c.Error
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
