// Package nbd is writeboost's Network Block Device server: it puts a
// Backend (the cache engine, a RAM disk, a raw block device) on the wire so
// that the kernel's nbd driver, nbdfuse, qemu or libnbd can use it as a
// disk. It speaks fixed-newstyle negotiation (OPT_GO, OPT_INFO with
// NBD_INFO_BLOCK_SIZE, OPT_EXPORT_NAME, OPT_LIST, OPT_ABORT) and the
// transmission commands READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES
// (+NO_HOLE) and DISC, with simple replies.
//
// Why not github.com/pojntfx/go-nbd's server: it handles one request at a
// time per connection (a 4K random workload at queue depth 32 then runs at
// queue depth 1), never advertises SEND_FLUSH, SEND_FUA, SEND_TRIM or
// SEND_WRITE_ZEROES and does not implement those commands. Without
// SEND_FLUSH the Linux driver assumes the disk has no write cache and never
// sends a flush, so fsync above a write-back cache would promise nothing.
// The wire format (go-nbd's protocol definitions where it has them, the
// rest from the protocol document) is package nbdproto's.
//
// Concurrency and memory: per connection, one reader goroutine parses
// requests and hands each to its own goroutine, which calls the backend and
// sends the reply, so replies go out in completion order; replies that
// complete together, or while the reader still has requests buffered,
// share one write syscall. Small reads and writes run on the reader itself
// while the backend answers them fast (see conn), which is what makes a RAM
// or cache-hit workload beat nbdkit on 2 cores. The requests and payload bytes in flight
// are bounded per connection (Config), payload buffers are pooled, and a
// READ's reply header is only written once its data has been read, so a
// failed read becomes an error reply instead of a torn stream.
//
// Durability: an export's transmission flags are derived from what its
// Backend implements (Flusher, FUAWriter, Trimmer, Zeroer, MultiConnSafe),
// so the client is only ever promised what the backend does. A FLUSH calls
// the backend's Flush after every write already replied to has returned
// from the backend, which is what the protocol asks.
package nbd
