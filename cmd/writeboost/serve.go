package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/control"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
	"github.com/writeboost-csi/writeboost-csi/pkg/volume"
)

type serveConfig struct {
	dataDir     string
	backing     string
	cache       string
	socket      string
	control     string
	bufferFile  string
	exportName  string
	backingSize int64
	cacheSize   int64
	segmentSize int64
	ramBuffers  int
	simulateHDD bool
	reformat    bool
	direct      bool
	attach      bool
	tunables    *tunableFlags
}

// bufferAuto asks serve to choose the buffer file (see defaultBufferPath).
const bufferAuto = "auto"

func newServeCommand() *cobra.Command {
	cfg := &serveConfig{backingSize: 4 << 30, cacheSize: 1 << 30}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve a cached volume over NBD on a unix socket (defaults: image files under ./writeboost-data/)",
		Long: `Serve a cached volume over NBD on a unix socket.

With no arguments, serve creates sparse image files ./writeboost-data/backing.img
(the slow device) and ./writeboost-data/cache.img (the cache), formats the cache,
and serves the cached volume on ./writeboost-data/nbd.sock. Point --backing and
--cache at real devices (an HDD and an NVMe partition) for real use.

RAM buffers live in a shared mapping of a file on /dev/shm by default, so a
killed server loses no acknowledged write: the next start replays them.
SIGINT or SIGTERM stops accepting, finishes requests in flight, flushes, and
writes a clean checkpoint.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runServe(cmd, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.dataDir, "data-dir", defaultDataDir, "directory for the default images and sockets")
	f.StringVar(&cfg.backing, "backing", "", "backing device or image (default DATA-DIR/backing.img, created sparse when missing)")
	f.StringVar(&cfg.cache, "cache", "", "cache device or image (default DATA-DIR/cache.img, created sparse and formatted when missing)")
	f.StringVar(&cfg.socket, "socket", "", "NBD unix socket (default DATA-DIR/nbd.sock)")
	f.StringVar(&cfg.control, "control", "", "control socket for status/set/drain (default DATA-DIR/control.sock)")
	f.Var(sizeValue{&cfg.backingSize}, "backing-size", "size of the backing image when it is created")
	f.Var(sizeValue{&cfg.cacheSize}, "cache-size", "size of the cache image when it is created")
	f.Var(sizeValue{&cfg.segmentSize}, "segment-size", "segment size when formatting (default: the engine's, 512KiB)")
	f.IntVar(&cfg.ramBuffers, "ram-buffers", 0, "number of segment-sized RAM buffers (default: the engine's, 16: 8 MiB of 512 KiB segments, room for deep queues of large writes; fewer on a cache of under 64 segments)")
	f.StringVar(&cfg.bufferFile, "buffer-file", bufferAuto, `file mapped for the RAM buffers; "auto" picks /dev/shm/writeboost-<hash of the cache path>.buf, "" keeps them on the heap (a killed server then loses unflushed writes)`)
	f.StringVar(&cfg.exportName, "export-name", "", "NBD export name")
	f.BoolVar(&cfg.simulateHDD, "simulate-hdd", false, "put the simulated HDD model (seek, rotation, transfer; real sleeps) in front of the backing device, for demos and benchmarks")
	f.BoolVar(&cfg.reformat, "reformat", false, "destroy whatever the cache holds (dirty data included) and format it afresh")
	f.BoolVar(&cfg.direct, "direct", true, "open the cache and backing with O_DIRECT (where the filesystem allows it); --direct=false goes through the page cache")
	f.BoolVar(&cfg.attach, "attach", false, "also attach the volume as a local block device, and detach it on exit")
	cfg.tunables = addTunableFlags(f)
	return cmd
}

func (cfg *serveConfig) resolve() error {
	def := func(p *string, name string) {
		if *p == "" {
			*p = filepath.Join(cfg.dataDir, name)
		}
	}
	def(&cfg.backing, "backing.img")
	def(&cfg.cache, "cache.img")
	def(&cfg.socket, "nbd.sock")
	def(&cfg.control, "control.sock")
	for _, p := range []*string{&cfg.backing, &cfg.cache, &cfg.socket, &cfg.control} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
	}
	if cfg.bufferFile == bufferAuto {
		p, err := defaultBufferPath(cfg.cache, cfg.dataDir)
		if err != nil {
			return err
		}
		cfg.bufferFile = p
	}
	return nil
}

// openError explains the engine's refusals in terms of serve's flags.
func openError(cfg *serveConfig, err error) error {
	switch {
	case errors.Is(err, engine.ErrForeign):
		return fmt.Errorf("%s holds something other than a writeboost cache; refusing to overwrite it "+
			"(pass --reformat to destroy its contents and format it): %w", cfg.cache, err)
	case errors.Is(err, engine.ErrBackingSize):
		return fmt.Errorf("the cache %s was made for a backing device of another size than %s; "+
			"use the backing device it was made for, or --reformat (its dirty data is lost): %w", cfg.cache, cfg.backing, err)
	case errors.Is(err, engine.ErrNewerFormat):
		return fmt.Errorf("the cache %s was written by a newer writeboost; upgrade this binary: %w", cfg.cache, err)
	case errors.Is(err, engine.ErrCorrupt):
		return fmt.Errorf("the cache %s is corrupt (run `writeboost check --cache %s` for details): %w", cfg.cache, cfg.cache, err)
	}
	return fmt.Errorf("open cache %s over %s: %w", cfg.cache, cfg.backing, err)
}

func runServe(cmd *cobra.Command, cfg *serveConfig) error {
	if err := cfg.resolve(); err != nil {
		return err
	}
	tun, err := cfg.tunables.tunables()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.dataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	backingCreated, err := ensureImage(cfg.backing, cfg.backingSize)
	if err != nil {
		return err
	}
	cacheCreated, err := ensureImage(cfg.cache, cfg.cacheSize)
	if err != nil {
		return err
	}
	if backingCreated && !cacheCreated && !cfg.reformat {
		return fmt.Errorf("the backing image %s was missing and has just been created empty, but the cache %s "+
			"already exists: its contents belong to the old backing image; restore that image, or pass --reformat "+
			"to start afresh (dirty data in the cache is lost)", cfg.backing, cfg.cache)
	}
	vcfg := volume.Config{
		ID: filepath.Base(cfg.cache), CachePath: cfg.cache, BackingPath: cfg.backing, IO: volume.DirectIO,
		Format: true, Reformat: cfg.reformat, SegmentSize: int(cfg.segmentSize), RAMBuffers: cfg.ramBuffers,
		BufferPath: cfg.bufferFile, Tunables: tun,
		Socket: cfg.socket, ExportName: cfg.exportName, Control: cfg.control,
		// Behind the simulated HDD a miss takes milliseconds: never run
		// requests inline on the connection reader then.
		NoInline: cfg.simulateHDD,
	}
	if !cfg.direct {
		vcfg.IO = volume.BufferedIO
	}
	if cfg.simulateHDD {
		// Real sleeps: what a user sees through NBD is an HDD's latency.
		vcfg.WrapBacking = func(d blockdev.Device) blockdev.Device {
			return hddsim.New(d, hddsim.DefaultModel(), hddsim.RealSleep)
		}
	}
	if cfg.attach {
		o, err := (&attachFlags{socket: cfg.socket, export: cfg.exportName, stateDir: defaultAttachStateDir}).options()
		if err != nil {
			return err
		}
		vcfg.Attacher, vcfg.AttachOptions = volume.SystemAttacher{}, o
	}

	// Catch signals before announcing the URI: whoever reads the URI may
	// signal at once, and an uncaught SIGTERM would kill the process
	// without the clean checkpoint.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	startCtx, cancelStart := context.WithTimeout(context.Background(), 2*time.Minute)
	vol, err := volume.Start(startCtx, vcfg)
	cancelStart()
	if err != nil {
		if errors.Is(err, volume.ErrInUse) {
			return err
		}
		return openError(cfg, err)
	}
	eng := vol.Engine()
	st := eng.Status()
	printUsage(cmd.OutOrStdout(), cfg, eng.Size(), st)
	if a, ok := vol.Attachment(); ok {
		fmt.Fprintf(cmd.OutOrStdout(), "\nAttached as %s (detached again when serve exits).\n", a.Device)
	}

	var serveErr error
	select {
	case sig := <-sigs:
		klog.InfoS("Shutting down: finishing requests in flight, flushing, writing a clean checkpoint (signal again to abort)", "signal", sig.String())
	case serveErr = <-vol.Done():
		klog.ErrorS(serveErr, "NBD server stopped")
	}
	first := time.Now()
	go func() {
		// A second signal aborts the graceful stop. With the buffers in a
		// shared mapping no acknowledged write is lost even then; the next
		// start recovers. Signals within a second of the first are the
		// same request delivered twice (to the process and its group, as
		// timeout(1) does), not a user insisting.
		for sig := range sigs {
			if time.Since(first) < time.Second {
				continue
			}
			klog.InfoS("Second signal: exiting without a clean shutdown", "signal", sig.String())
			klog.Flush()
			os.Exit(1)
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Detach first (the kernel's last flush still reaches the server),
	// then stop serving, close the engine (clean checkpoint) and unlock.
	var errs []error
	if err := vol.Stop(ctx); err != nil {
		errs = append(errs, err)
	} else {
		klog.InfoS("Cache closed cleanly", "cache", cfg.cache)
	}
	if serveErr != nil {
		errs = append(errs, serveErr)
	}
	return errors.Join(errs...)
}

// nbdURI is the NBD URI of a unix-socket export (the libnbd URI spec).
func nbdURI(socket, export string) string {
	return "nbd+unix:///" + uriEscape(export) + "?socket=" + uriEscape(socket)
}

// uriEscape percent-encodes all but unreserved characters and '/', so a
// usual socket path appears in the URI as itself.
func uriEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("/-._~", c) >= 0 {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}

func printUsage(w io.Writer, cfg *serveConfig, size int64, st engine.Status) {
	uri := nbdURI(cfg.socket, cfg.exportName)
	fmt.Fprintf(w, `writeboost %s: serving a %s cached volume
  backing: %s (%s)
  cache:   %s (%s, %d dirty blocks recovered)

NBD URI: %s

Use it:
  nbdinfo '%[8]s'
  qemu-img info '%[8]s'
  nbd-client -unix %[9]s /dev/nbd0     # kernel NBD, where the nbd module exists
  mkdir -p /tmp/wb && nbdfuse /tmp/wb '%[8]s' &     # FUSE file /tmp/wb/nbd
  losetup --find --show /tmp/wb/nbd    # a block device; then mkfs, mount
Watch it:
  writeboost status --control %[10]s
  writeboost set --control %[10]s writeback_threshold=0
  writeboost drain --control %[10]s
Stop with Ctrl-C (or SIGTERM): requests finish, the cache flushes and closes cleanly.
`, version, control.HumanBytes(size), cfg.backing, control.HumanBytes(st.BackingSize), cfg.cache,
		control.HumanBytes(st.CacheSize), st.NrDirtyCacheBlocks, uri, cfg.socket, cfg.control)
	if cfg.simulateHDD {
		fmt.Fprintln(w, "The backing device is behind the simulated HDD model (--simulate-hdd).")
	}
	if cfg.bufferFile == "" {
		fmt.Fprintln(w, "Warning: RAM buffers on the heap (--buffer-file=\"\"): a killed server loses writes acknowledged since the last flush.")
	}
}
