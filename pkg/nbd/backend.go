package nbd

// Backend is what an export serves: the cache engine, a RAM disk or a raw
// block device. Methods are called concurrently (many requests are in
// flight per connection, and there may be several connections).
//
// WriteAt's data need not be durable when it returns. If it may not be, the
// backend MUST implement Flusher, or the server advertises no write cache
// and the client (the Linux driver in particular) will never ask for a
// flush: a backend without Flusher promises that every write is durable
// when WriteAt returns.
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Size() int64
}

// Flusher makes every write that completed before Flush was called durable.
// Turns on NBD_FLAG_SEND_FLUSH (and SEND_FUA, done as write + flush when the
// backend is not a FUAWriter).
type Flusher interface {
	Flush() error
}

// FUAWriter writes and returns only when that data is durable. Turns on
// NBD_FLAG_SEND_FUA.
type FUAWriter interface {
	WriteFUA(p []byte, off int64) error
}

// Trimmer discards a range. Turns on NBD_FLAG_SEND_TRIM. Durability is that
// of a write: covered by the next Flush.
type Trimmer interface {
	Trim(off, length int64) error
}

// Zeroer makes a range read back as zeros. Turns on
// NBD_FLAG_SEND_WRITE_ZEROES. NBD_CMD_FLAG_NO_HOLE asks the server not to
// deallocate the range; since a Zeroer's zeros always read back as zeros,
// the flag only concerns allocation, which is advisory for every backend we
// serve, so it is accepted and passed on to nobody.
type Zeroer interface {
	WriteZeroes(off, length int64) error
}

// MultiConnSafe reports whether a Flush covers writes completed through any
// connection (true for a backend shared by all connections whose Flush is
// global). Only then is NBD_FLAG_CAN_MULTI_CONN advertised.
type MultiConnSafe interface {
	MultiConnSafe() bool
}

// Export is one named export of a Server.
type Export struct {
	// Name as the client asks for it; "" is the default export.
	Name string
	// Description is sent in NBD_INFO_DESCRIPTION when asked for.
	Description string
	Backend     Backend
	// ReadOnly sets NBD_FLAG_READ_ONLY; writes, trims and zeroes get EPERM.
	ReadOnly bool
	// Block size constraints for NBD_INFO_BLOCK_SIZE; zero means the
	// defaults 512 / 4096 / MaxPayload. The server itself accepts any
	// alignment; these are what it asks well-behaved clients to use.
	MinBlockSize, PreferredBlockSize, MaxBlockSize uint32
}

// exportState is an Export with its capabilities resolved once.
type exportState struct {
	Export
	flags     uint16
	flusher   Flusher
	fua       FUAWriter
	trimmer   Trimmer
	zeroer    Zeroer
	minBS     uint32
	prefBS    uint32
	maxBS     uint32
	maxLength uint32 // largest READ/WRITE accepted
}

func newExportState(e Export) *exportState {
	st := &exportState{Export: e}
	flags := FlagHasFlags
	if f, ok := e.Backend.(Flusher); ok {
		st.flusher = f
		flags |= FlagSendFlush
	}
	if !e.ReadOnly {
		if f, ok := e.Backend.(FUAWriter); ok {
			st.fua = f
		}
		if st.fua != nil || st.flusher != nil {
			flags |= FlagSendFUA
		}
		if t, ok := e.Backend.(Trimmer); ok {
			st.trimmer = t
			flags |= FlagSendTrim
		}
		if z, ok := e.Backend.(Zeroer); ok {
			st.zeroer = z
			flags |= FlagSendWriteZeroes
		}
	} else {
		flags |= FlagReadOnly
	}
	if m, ok := e.Backend.(MultiConnSafe); ok && m.MultiConnSafe() {
		flags |= FlagCanMultiConn
	}
	st.flags = flags
	st.minBS, st.prefBS, st.maxBS = e.MinBlockSize, e.PreferredBlockSize, e.MaxBlockSize
	if st.minBS == 0 {
		st.minBS = 512
	}
	if st.prefBS == 0 {
		st.prefBS = 4096
	}
	if st.maxBS == 0 || st.maxBS > MaxPayload {
		st.maxBS = MaxPayload
	}
	st.maxLength = MaxPayload
	return st
}

// size is the export's size now: a backend may grow while served (the
// engine's Grow), and a connection then addresses the new range, as the
// kernel's device does once resized. A client sees the size of its
// handshake until it resizes its device.
func (st *exportState) size() uint64 { return uint64(max(st.Backend.Size(), 0)) }

// Flags returns the transmission flags an export with this configuration
// advertises (for callers that configure a kernel client themselves).
func (e Export) Flags() uint16 { return newExportState(e).flags }
