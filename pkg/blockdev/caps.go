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

// Discarder is implemented by devices that can deallocate a range: after
// Discard the range's contents are unspecified (zeros, old data) until
// written again, with the durability of a write. The engine calls it only
// for a thin-provisioned backing device whose pool asks for it; Zero must
// never be used to free space, since it may not deallocate (a pool that
// promised space keeps it).
type Discarder interface {
	Discard(off, length int64) error
}

// Discard implements Discarder: Mem drops the range's pages (reads
// return zeros), with the durability of a write.
func (m *Mem) Discard(off, length int64) error { return m.Zero(off, length) }

// Discard implements Discarder; it counts as a write. A wrapped device
// without Discard returns ErrUnsupported.
func (f *Faulty) Discard(off, length int64) error {
	if err := f.check(&f.mu.write, "discard"); err != nil {
		return err
	}
	d, ok := f.d.(Discarder)
	if !ok {
		return ErrUnsupported
	}
	return d.Discard(off, length)
}

// Discard implements Discarder, counting calls and bytes.
func (c *Counting) Discard(off, length int64) error {
	d, ok := c.d.(Discarder)
	if !ok {
		return ErrUnsupported
	}
	err := d.Discard(off, length)
	c.discards.Add(1)
	if err != nil {
		c.writeErrs.Add(1)
		return err
	}
	c.discardBytes.Add(length)
	return nil
}

// Grower is implemented by devices whose size can go up while they are
// open: the storage under them (a pool's file or logical volume) was
// made bigger, and the device takes the new bytes.
//
// Grow makes Size at least size. It fails if the storage under the device
// is smaller than size, and never shrinks the device. The bytes between
// the old and the new size read as whatever the storage holds there: the
// owner of the storage (pkg/pool) promises zeros, so that a grown volume
// never shows another tenant's data. The new size is as durable as the
// storage's own growth, which the owner makes durable before Grow.
type Grower interface {
	Grow(size int64) error
}

// Grow implements Grower by growing the wrapped device; it counts as a
// write (an armed write fault fails it).
func (f *Faulty) Grow(size int64) error {
	if err := f.check(&f.mu.write, "grow"); err != nil {
		return err
	}
	g, ok := f.d.(Grower)
	if !ok {
		return ErrUnsupported
	}
	return g.Grow(size)
}

// Grow implements Grower by growing the wrapped device; a failure counts
// as a write error (as Faulty counts it as a write).
func (c *Counting) Grow(size int64) error {
	g, ok := c.d.(Grower)
	if !ok {
		return ErrUnsupported
	}
	err := g.Grow(size)
	if err != nil {
		c.writeErrs.Add(1)
	}
	return err
}
