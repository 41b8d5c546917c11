// Package engine is writeboost's log-structured write-back cache: it turns
// a fast cache device and a slow backing device (both blockdev.Device)
// into one cached block device, in the design of dm-writeboost.
//
// Writes are copied into RAM buffers, each a segment in its exact on-disk
// form (pkg/layout specifies the format), and acknowledged at once. A
// full buffer is sealed and written by the flusher goroutine to the next
// slot of the segment ring on the cache device, in id order. A flush
// writes the open buffer's new blocks and a header copy into its slot and
// leaves it open, so fsync-heavy loads fill segments instead of spending
// one per flush; the ticker seals a buffer that has gone quiet, so that
// writeback reaches it.
// An index (backing block -> cache position, about 13 bytes per cache
// block) serves reads from RAM buffers, the cache device or the backing
// device, merged sector by sector. The writebacker goroutine copies dirty
// blocks of the oldest segments to the backing device in sorted batches,
// filling short gaps between them with newer cached copies so that a
// mostly dirty disk is swept in long runs (writeback.go); a checkpoint
// record then lets their slots be reused. When the ring is pressed and the
// oldest segments hold few live dirty blocks, the same goroutine cleans
// them instead: it copies those blocks forward into the head of the log,
// where they stay dirty, and passes the segments without waiting for the
// backing device (clean.go), so a working set of a large share of the
// cache keeps running at cache speed after the log wraps. The ticker
// goroutine measures backing utilisation and drives the interval
// tunables. All three are owned by the Engine: Open starts them, Close
// stops them.
//
// # Guarantees, by failure
//
//   - Flush returns once every write acknowledged before it was called is
//     durable on the cache device; a WriteFUA returns once its own data is.
//     Concurrent flushes share one segment write and one device flush.
//   - Power loss (or a crash of the machine): every write covered by a
//     completed Flush or WriteFUA survives. Any other sector reads back its
//     old value or one of the values written to it since; never garbage.
//     Recovery replays the log; segments are checksummed (CRC-32C), a torn
//     tail is recognised and dropped, and an epoch number in every segment
//     keeps a stale segment beyond a recovered tail from being replayed
//     after a later crash.
//   - The serving process is killed (SIGKILL) while the machine stays up:
//     with RAM buffers in a shared file mapping (Options.BufferPath,
//     OpenBufferFile, on tmpfs) no acknowledged write is lost, flushed or
//     not: the next Open finds the buffers of the dead process (checked
//     against the cache's UUID and the kernel's boot id) and appends them to
//     the log before serving. With heap buffers only flushed writes survive.
//   - Device errors surface as errors wrapping syscall.EIO. A failed write
//     or flush of the cache device makes the engine refuse further writes
//     (reads go on where they can); a failed writeback is retried and shown
//     in Status and Err.
//
// # Discards
//
// Trim and WriteZeroes are ordered with the log by a record (layout:
// trim, zero) and cost the request no backing I/O. After a trim the
// range is unspecified until written (nothing is owed to the backing
// device; Options.BackingDiscard passes it down to a thin one). A zero
// range reads as zeros at once and after any crash; writeback zeroes the
// backing device later, in place, in sorted runs. A later write wins over
// both. See discard.go.
//
// # What is not kept across an open
//
// The read cache (read_cache_threshold) is rebuilt from scratch: clean
// copies are not replayed, since a write-around write does not go through
// the log and could otherwise be shadowed by a stale copy.
package engine
