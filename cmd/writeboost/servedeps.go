package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
)

type devices struct{ cache, backing blockdev.Device }

func (d *devices) close() error {
	return errors.Join(d.cache.Close(), d.backing.Close())
}

func openDevices(cfg *serveConfig) (*devices, error) {
	cache, err := blockdev.OpenFile(cfg.cache, blockdev.FileOptions{Direct: cfg.direct})
	if err != nil {
		return nil, fmt.Errorf("open cache: %w", err)
	}
	backingFile, err := blockdev.OpenFile(cfg.backing, blockdev.FileOptions{})
	if err != nil {
		cache.Close()
		return nil, fmt.Errorf("open backing: %w", err)
	}
	var backing blockdev.Device = backingFile
	if cfg.simulateHDD {
		// Real sleeps: what a user sees through NBD is an HDD's latency.
		backing = hddsim.New(backingFile, hddsim.DefaultModel(), hddsim.RealSleep)
	}
	return &devices{cache: cache, backing: backing}, nil
}

// multiConnEngine tells the NBD server that a flush on one connection
// covers writes acknowledged on all: the engine has one log, and Flush
// makes every acknowledged write durable.
type multiConnEngine struct{ *engine.Engine }

func (multiConnEngine) MultiConnSafe() bool { return true }

type nbdServer struct {
	srv  *nbd.Server
	done chan error
}

func (n *nbdServer) shutdown(ctx context.Context) error { return n.srv.Shutdown(ctx) }

func startNBD(cfg *serveConfig, e *engine.Engine) (*nbdServer, error) {
	// Behind the simulated HDD a miss takes milliseconds: never run requests
	// inline on the connection reader then.
	srv := nbd.NewServer(nbd.Config{NoInline: cfg.simulateHDD})
	if err := srv.AddExport(nbd.Export{Name: cfg.exportName, Description: "writeboost " + cfg.cache,
		Backend: multiConnEngine{e}, MinBlockSize: 512, PreferredBlockSize: 4096}); err != nil {
		return nil, fmt.Errorf("NBD export: %w", err)
	}
	l, err := nbd.ListenUnix(cfg.socket, 0o600)
	if err != nil {
		return nil, fmt.Errorf("NBD socket %s: %w", cfg.socket, err)
	}
	n := &nbdServer{srv: srv, done: make(chan error, 1)}
	go func() {
		err := srv.Serve(l)
		if errors.Is(err, nbd.ErrServerClosed) {
			return
		}
		n.done <- err
	}()
	return n, nil
}

// attachVolume makes the served export a local block device (kernel NBD
// where available, else nbdfuse + loop) and returns a function that
// detaches it.
func attachVolume(cfg *serveConfig) (string, func() error, error) {
	o, err := (&attachFlags{socket: cfg.socket, export: cfg.exportName, stateDir: defaultAttachStateDir}).options()
	if err != nil {
		return "", nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	a, err := attach.Attach(ctx, o)
	if err != nil {
		return "", nil, err
	}
	detach := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		return attach.Detach(ctx, defaultAttachStateDir, a.Device)
	}
	return a.Device, detach, nil
}
