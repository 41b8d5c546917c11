package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
)

// nbdServeMain is `bench nbd-serve`: it serves one export on a unix socket
// until SIGINT/SIGTERM. In the VM (make bench-vm) it exports the HDD model
// raw, so that the kernel's nbd driver makes it a block device that every
// cache under test sits on (seeks and rotation then cost them all alike),
// and pkg/nbd over RAM, to tell the kernel NBD round trip from the
// engine's own cost.
//
//	--kind hdd  the HDD model (pkg/hddsim, default model, real sleeps) in
//	            front of --path (a file, created sparse at --size when
//	            missing, or a block device)
//	--kind mem  pkg/nbd's RAM backend of --size bytes
func nbdServeMain(args []string) error {
	fs := flag.NewFlagSet("nbd-serve", flag.ContinueOnError)
	kind := fs.String("kind", "hdd", `"hdd" or "mem"`)
	path := fs.String("path", "", "data file or block device behind the HDD model")
	size := fs.Int64("size", 1<<30, "size of a new data file, or of the RAM export, bytes")
	sock := fs.String("socket", "", "unix socket to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sock == "" {
		return fmt.Errorf("nbd-serve: --socket is required")
	}
	var (
		backend nbd.Backend
		cfg     nbd.Config
	)
	switch *kind {
	case "hdd":
		if *path == "" {
			return fmt.Errorf("nbd-serve --kind hdd: --path is required")
		}
		if _, err := os.Stat(*path); os.IsNotExist(err) {
			if err := blockdev.CreateSparseFile(*path, *size); err != nil {
				return fmt.Errorf("create %s: %w", *path, err)
			}
		}
		f, err := blockdev.OpenFile(*path, blockdev.FileOptions{})
		if err != nil {
			return fmt.Errorf("open %s: %w", *path, err)
		}
		disk := hddsim.New(f, hddsim.DefaultModel(), hddsim.RealSleep)
		defer disk.Close()
		backend = disk
		// The model holds each request for milliseconds: never make the
		// connection's reader wait behind one.
		cfg.NoInline = true
	case "mem":
		backend = nbd.NewMemBackend(*size)
	default:
		return fmt.Errorf("nbd-serve: unknown --kind %q", *kind)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	stop, err := serveInProcess(*sock, backend, cfg)
	if err != nil {
		return err
	}
	klog.InfoS("serving", "kind", *kind, "socket", *sock, "bytes", backend.Size())
	<-ctx.Done()
	stop()
	return nil
}
