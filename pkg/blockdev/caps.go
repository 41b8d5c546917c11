package blockdev

// ZeroDeallocator is implemented by devices whose Zero deallocates the
// range (punches a hole, discards) instead of writing zeros. Models of
// device cost (the simulated HDD) use it to charge Zero as a metadata
// operation rather than as a write of the whole range.
type ZeroDeallocator interface {
	// ZeroDeallocates reports whether Zero deallocates rather than writes.
	ZeroDeallocates() bool
}

// ZeroDeallocates reports whether d's Zero deallocates (see
// ZeroDeallocator); false when d does not say.
func ZeroDeallocates(d Device) bool {
	z, ok := d.(ZeroDeallocator)
	return ok && z.ZeroDeallocates()
}

// ZeroDeallocates implements ZeroDeallocator: Mem drops zeroed pages.
func (m *Mem) ZeroDeallocates() bool { return true }

// ZeroDeallocates implements ZeroDeallocator by asking the wrapped device.
func (f *Faulty) ZeroDeallocates() bool { return ZeroDeallocates(f.d) }

// ZeroDeallocates implements ZeroDeallocator by asking the wrapped device.
func (c *Counting) ZeroDeallocates() bool { return ZeroDeallocates(c.d) }
