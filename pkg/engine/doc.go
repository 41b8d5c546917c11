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
//   - Device errors surface as errors wrapping syscall.EIO. A failed
//     writeback is retried and shown in Status, Health and Err. The first
//     error of the cache device (read, write or flush) makes the cache
//     dead: see "A dead cache device" below.
//
// # A dead cache device
//
// The first I/O error the cache device returns ends its use for the rest
// of the open: nothing is read from or written to it again (no segment, no
// checkpoint, no writeback read), so it stays exactly as it failed, for
// `writeboost check` and for recovery. The flusher, writeback and the
// cleaner stop. What the volume serves is decided at that moment, after
// bcache's stop_when_cache_set_failed=auto and Open CAS's rules (health.go):
//
//   - Nothing owed to the backing device (no dirty block, no pending zero
//     record) and the newest durable checkpoint passes every segment that
//     may be on the device: pass-through. Reads, writes, zeroes and flushes
//     go to the backing device (writes durable on Flush or FUA, as on any
//     disk); Health is HealthPassThrough. No later recovery of this cache
//     can replay a copy over what was passed through: the checkpoint says
//     everything is written back, and the RAM buffers are marked replayed.
//     A volume gets there by a drain (the preStop hook), or when
//     writeback and a checkpoint have caught up.
//   - Otherwise the dirty data is stranded: HealthFailed, with the number
//     of stranded blocks. A read of a sector whose newest data is stranded
//     fails with EIO; the backing device's copy is stale, and serving it
//     would hand the filesystem a mix of old and new metadata (bcache stops
//     such a device; forcing it to run is how its users corrupted their
//     filesystems). Reads of every other sector pass through. Writes,
//     trims, zeroes, flushes and drains fail with EIO: a write to the
//     backing device could be undone by a later recovery of the cache
//     replaying an older copy, and a flush cannot make the stranded writes
//     durable (Open CAS likewise fails I/O after a write-back error).
//
// Recovery, for an operator: stop the volume (unstage it, or stop
// `writeboost serve`), then run `writeboost check --cache PATH`. If the
// device reads and checks out (a transient fault, a loose cable), open it
// again: recovery replays the log and writeback empties it; nothing is
// lost. If it cannot be read, the stranded writes are gone with it: format
// a new cache for the volume (`writeboost serve --reformat`, or delete and
// re-create the cache slice) and check the filesystem on the backing
// device (fsck), which holds everything written back before the failure.
// A pass-through volume lost nothing: give it a new cache the same way,
// or reopen the old one once it works again.
//
// # A cache device that lies about flushes
//
// Recovery trusts the checkpoint's last_flushed_id: every segment up to it
// was durable before the checkpoint was written. If one of them reads
// blank or corrupt, the device acknowledged flushes it did not do (a
// volatile write cache without power-loss protection, a virtual disk with
// cache=unsafe), and the writes in those segments are lost. The log ends
// before them, as it must, and the volume opens, but the loss is logged at
// error level and reported in Health (CauseLostFlushedSegments, with the
// count and ids) for the driver's VolumeCondition and the metrics.
//
// # Files
//
// Each file owns one part of the engine: engine.go the Engine and buffer
// types and the helpers every part uses; open.go Open and Close;
// write.go the write path (WriteAt, WriteFUA, filling and sealing RAM
// buffers); flush.go Flush and the flusher goroutine (segment writes);
// checkpoint.go checkpoint records; read.go the read path; discard.go trim
// and zero records; writeback.go the writebacker goroutine and its batches;
// clean.go the cleaner; pace.go the pacing of writes; ticker.go the
// modulator goroutine and the backing utilisation it measures; drain.go
// Drain; writearound.go write_around_mode; health.go Health and a dead
// cache device; recover.go formatting and
// recovery; index.go the block index; buffer.go RAM buffer memory;
// memory.go the memory figures; status.go Status and tunables; clock.go
// the Clock; step.go stepping mode; grow.go Grow.
//
// # Locking, and how far it scales
//
// Every lock is per volume (per Engine); engines share no mutable state,
// so volumes run side by side on as many cores as the node has. Within one
// volume:
//
//   - mu, one mutex, guards the index, the RAM buffers' bookkeeping, the
//     ring ids and the counters. WriteAt holds it for the whole request,
//     copying the data into the RAM buffer under it (it is released only
//     to read an older copy for a partial overwrite, and while waiting for
//     room); ReadAt holds it to plan the read and copy what the RAM buffers
//     hold, and reads the devices without it; Trim/WriteZeroes append
//     their record under it; Flush holds it only to ask and waits on the
//     cond (which releases it); Status, SetTunable and pace take it
//     briefly. The goroutines take it for bookkeeping only: no device I/O
//     is done under mu.
//   - cond, one sync.Cond on mu, broadcast on every state change: every
//     waiter (writers waiting for room, flushes, the three goroutines,
//     drains) wakes on every change and re-checks.
//   - wbMu (RWMutex): a writeback or cleaning batch holds it exclusively
//     while it writes the backing device; a write-around write, a zero
//     written around and a passed-down trim hold it shared.
//   - ckptMu serialises checkpoint writes with the cache flush that makes
//     each durable.
//   - the metered backing device has its own small mutex (utilisation).
//
// So one volume's foreground is serial on mu: writes, and the RAM-buffer
// part of reads, of all its connections run one at a time, and a single
// volume's write throughput is bounded by one core's memory copy plus
// bookkeeping, however many cores there are; device reads and all device
// writes proceed in parallel with it. Past 2 cores a single volume gains
// only from overlapping its device I/O (flusher, writeback, read misses)
// with the foreground, and the one broadcast cond costs more as waiters
// multiply (a profile of 1 MiB writes at QD4 spent about 15 % in
// Broadcast/Wait). Many volumes scale with cores: each has its own mu,
// cond and goroutines.
//
// # Per-volume cost, and how many volumes a node runs
//
// Each open engine runs three goroutines (flusher, writebacker, ticker),
// the ticker waking once a second even when the volume is idle. Its memory
// (memory.go, EstimateMemory; pkg/membudget adds the NBD request payloads)
// is: the index, about 13 bytes per 4 KiB cache block (3.3 MiB per GiB of
// cache, 0.32 % of its size), held for as long as the volume is open; the
// RAM buffers, 16 x (512 KiB + 4 KiB) = 8 MiB at the defaults; the
// writeback scratch, up to 16 MiB + 4 MiB while a batch runs. Nothing
// else grows with the volume. The limits a node applies are the plugin's
// max-volumes (default 64) and its memory budget (pkg/membudget), which
// admits a volume only when its worst case fits: with 10 GiB cache slices
// that is about 33 MiB of index + 8 MiB of buffers + 20 MiB of scratch
// per volume before NBD payloads, so 64 such volumes reserve about
// 3.8 GiB. CPU is not the limit for idle volumes (a tick a second each);
// a busy volume's foreground is serial on its mu, so it uses at most about
// one core for that (not measured on more than 2 cores).
//
// # Time, and a deterministic core
//
// Every use of time goes through Options.Clock (clock.go): the
// modulator's tick, pacing, writeback's retry backoff, Drain's poll,
// checkpoint timestamps and utilisation. In stepping mode (tests, step.go)
// Open starts no goroutines: the flusher's, writebacker's and ticker's
// rounds run only when a test steps them or inline where an operation
// would wait for them, so a workload driven from one goroutine on a fake
// clock issues the same device writes in the same order on every run; the
// crash sweep relies on it to replay any failing crash point exactly.
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
// # Growing
//
// A volume grows while it serves I/O (Grow, grow.go), or at Open when the
// backing device is found bigger (Options.AllowBackingGrowth). The backing
// device grows first (its owner, pkg/pool, makes the new range read as
// zeros and the growth durable), then the superblock is rewritten with
// the new backing size and a higher sequence, copy 1 then copy 0, each
// made durable before the next; requests beyond the old end are accepted
// only after that. The backing size is the only thing that changes: the
// log, the checkpoints and the index do not depend on it. A crash during a
// grow therefore recovers the old size or the new one (the superblock
// copy with the higher valid sequence), never a mix, and the grown range
// reads zeros until written. Recovered at the old size, the volume sees a
// bigger backing device than its superblock names and is refused with
// ErrBackingSize unless growth is allowed, which finishes the grow.
// TestGrowCrashSweep crashes at every device write of a grow and of the
// I/O after it.
//
// # What is not kept across an open
//
// The read cache (read_cache_threshold) is rebuilt from scratch: clean
// copies are not replayed, since a write-around write does not go through
// the log and could otherwise be shadowed by a stale copy.
package engine
