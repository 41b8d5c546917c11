package driver

import (
	"errors"

	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
)

// startPools starts the background work of the pools (the LVM wiper,
// which resumes wipes a previous process left).
func (d *Driver) startPools() {
	for _, p := range []pool.Pool{d.opts.HDD, d.opts.NVMe} {
		if w, ok := p.(pool.Wiper); ok {
			w.StartWiper()
		}
	}
}

// closePools stops the pools' background work (a wipe in progress
// resumes at the next start).
func (d *Driver) closePools() error {
	var errs []error
	for _, p := range []pool.Pool{d.opts.HDD, d.opts.NVMe} {
		if w, ok := p.(pool.Wiper); ok {
			errs = append(errs, w.Close())
		}
	}
	return errors.Join(errs...)
}

// poolWipes reports the wipers for the metrics, by pool role.
func (d *Driver) poolWipes() map[string]pool.WipeStatus {
	out := map[string]pool.WipeStatus{}
	for role, p := range map[string]pool.Pool{"hdd": d.opts.HDD, "nvme": d.opts.NVMe} {
		if w, ok := p.(pool.Wiper); ok {
			out[role] = w.WipeStatus()
		}
	}
	return out
}
