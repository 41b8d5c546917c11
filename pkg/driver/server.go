package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/membudget"
	"github.com/writeboost-csi/writeboost-csi/pkg/metrics"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
	"github.com/writeboost-csi/writeboost-csi/pkg/volume"
)

// FileConfig is the plugin's config file (YAML, strict: unknown keys are
// errors), as the Helm chart renders it.
type FileConfig struct {
	Pools struct {
		HDD  *pool.Config `json:"hdd,omitempty"`
		NVMe *pool.Config `json:"nvme,omitempty"`
	} `json:"pools"`
	DefaultCacheFraction float64 `json:"defaultCacheFraction,omitempty"`
	MinCacheSize         string  `json:"minCacheSize,omitempty"`
	MaxVolumes           int     `json:"maxVolumes,omitempty"`
	// MemoryBudget bounds the memory of the staged volumes (a quantity,
	// e.g. 3Gi); empty: the container's memory limit less 256 MiB
	// (package membudget).
	MemoryBudget string `json:"memoryBudget,omitempty"`
}

// LoadFileConfig reads and validates a config file.
func LoadFileConfig(path string) (*FileConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var c FileConfig
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if c.DefaultCacheFraction < 0 || c.DefaultCacheFraction > 1 {
		return nil, fmt.Errorf("config %s: defaultCacheFraction %v is not in (0, 1]", path, c.DefaultCacheFraction)
	}
	if c.MinCacheSize != "" {
		if _, err := params.ParseQuantity(c.MinCacheSize); err != nil {
			return nil, fmt.Errorf("config %s: minCacheSize: %w", path, err)
		}
	}
	if c.MemoryBudget != "" {
		if n, err := params.ParseQuantity(c.MemoryBudget); err != nil || n <= 0 {
			return nil, fmt.Errorf("config %s: memoryBudget %q: want a positive quantity such as 3Gi", path, c.MemoryBudget)
		}
	}
	if c.MaxVolumes < 0 {
		return nil, fmt.Errorf("config %s: maxVolumes %d is negative", path, c.MaxVolumes)
	}
	return &c, nil
}

// Config is the plugin's command line (see CSI-CONTRACT.md).
type Config struct {
	Endpoint       string
	NodeID         string
	ConfigFile     string
	HDDPool        string
	NVMePool       string
	StateDir       string
	RunDir         string
	MetricsAddress string
	HealthAddress  string
	MaxVolumes     int
	Version        string
	// RelayCommand runs the NBD relay of the fallback attach path.
	RelayCommand []string
	// CacheReadDelay slows every read of every cache device (a test
	// harness for slow recoveries; hidden flag).
	CacheReadDelay time.Duration
	// AttachMethod forces an attach method ("" = the best available; a
	// hidden flag: tests run the nbdfuse fallback on a kernel with nbd).
	AttachMethod string
}

// Build makes the driver from cfg: pools, node state and runtime.
func Build(cfg Config) (*Driver, error) {
	if cfg.NodeID == "" {
		return nil, errors.New("--node-id is required")
	}
	if cfg.StateDir == "" || cfg.RunDir == "" {
		return nil, errors.New("--state-dir and --run-dir are required")
	}
	fc := &FileConfig{}
	if cfg.ConfigFile != "" {
		var err error
		if fc, err = LoadFileConfig(cfg.ConfigFile); err != nil {
			return nil, err
		}
	}
	hddCfg, nvmeCfg := fc.Pools.HDD, fc.Pools.NVMe
	if cfg.HDDPool != "" {
		hddCfg = &pool.Config{Kind: pool.KindDirectory, Path: cfg.HDDPool}
	}
	if cfg.NVMePool != "" {
		nvmeCfg = &pool.Config{Kind: pool.KindDirectory, Path: cfg.NVMePool}
	}
	if hddCfg == nil || nvmeCfg == nil {
		return nil, errors.New("both an HDD and an NVMe pool are required (--hdd-pool/--nvme-pool or the config file)")
	}
	if hddCfg.Kind == pool.KindLVM && nvmeCfg.Kind == pool.KindLVM && hddCfg.VolumeGroup == nvmeCfg.VolumeGroup {
		// Each LVM pool owns its group's free space (its wiper).
		return nil, fmt.Errorf("the hdd and nvme pools share the volume group %s", hddCfg.VolumeGroup)
	}
	hdd, err := pool.New(*hddCfg)
	if err != nil {
		return nil, fmt.Errorf("hdd pool: %w", err)
	}
	nvme, err := pool.New(*nvmeCfg)
	if err != nil {
		return nil, fmt.Errorf("nvme pool: %w", err)
	}
	st, err := nodestate.Open(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	var minCache int64
	if fc.MinCacheSize != "" {
		minCache, _ = params.ParseQuantity(fc.MinCacheSize)
	}
	maxVol := fc.MaxVolumes
	if cfg.MaxVolumes > 0 {
		maxVol = cfg.MaxVolumes
	}
	limit, from := membudget.DefaultLimit()
	if fc.MemoryBudget != "" {
		limit, _ = params.ParseQuantity(fc.MemoryBudget)
		from = "config memoryBudget"
	}
	klog.InfoS("Memory budget", "bytes", limit, "budget", membudget.Bytes(limit), "from", from)
	rt := &volume.Manager{RunDir: cfg.RunDir, AttachStateDir: filepath.Join(cfg.StateDir, "attach"),
		RelayCommand: cfg.RelayCommand, PreferMethod: cfg.AttachMethod}
	if d := cfg.CacheReadDelay; d > 0 {
		klog.InfoS("Every cache read is delayed (--debug-cache-read-delay)", "delay", d)
		rt.WrapCache = func(dev blockdev.Device) blockdev.Device { return slowReads{dev, d} }
	}
	return New(Options{NodeID: cfg.NodeID, Version: cfg.Version, HDD: hdd, NVMe: nvme, State: st, Runtime: rt,
		MaxVolumes: maxVol, DefaultCacheFraction: fc.DefaultCacheFraction, MinCacheSize: minCache,
		Budget: membudget.New(limit)})
}

// slowReads delays every read of a device (CacheReadDelay).
type slowReads struct {
	blockdev.Device
	delay time.Duration
}

func (s slowReads) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.Device.ReadAt(p, off)
}

// parseEndpoint accepts unix:///path, unix:/path, a bare path, or
// tcp://host:port (only when asked for explicitly).
func parseEndpoint(ep string) (network, addr string, err error) {
	switch {
	case strings.HasPrefix(ep, "unix://"):
		return "unix", strings.TrimPrefix(ep, "unix://"), nil
	case strings.HasPrefix(ep, "unix:"):
		return "unix", strings.TrimPrefix(ep, "unix:"), nil
	case strings.HasPrefix(ep, "tcp://"):
		return "tcp", strings.TrimPrefix(ep, "tcp://"), nil
	case strings.HasPrefix(ep, "/"):
		return "unix", ep, nil
	}
	return "", "", fmt.Errorf("endpoint %q: want unix:///path or tcp://host:port", ep)
}

func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	klog.V(4).InfoS("CSI call", "method", info.FullMethod, "request", req)
	resp, err := handler(ctx, req)
	if err != nil {
		klog.ErrorS(err, "CSI call failed", "method", info.FullMethod)
	} else {
		klog.V(2).InfoS("CSI call done", "method", info.FullMethod)
	}
	return resp, err
}

// Serve runs the plugin until ctx ends, then stops gracefully: finishes
// calls in flight and flushes and closes every engine (devices stay
// attached for the next plugin process).
func (d *Driver) Serve(ctx context.Context, cfg Config) error {
	network, addr, err := parseEndpoint(cfg.Endpoint)
	if err != nil {
		return err
	}
	// Listen at once, re-adopt in the background: a plugin that only
	// listened after every recovery would fail its probes (and its
	// registration) for as long as the slowest recovery takes, and be
	// killed mid-recovery again and again. Until re-adoption ends, Probe
	// reports not ready and calls on recovering volumes get Unavailable.
	staged := d.beginReadopt()
	d.startPools()
	defer d.closePools()
	if network == "unix" {
		if err := os.MkdirAll(filepath.Dir(addr), 0o750); err != nil {
			return err
		}
		if err := os.Remove(addr); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale socket %s: %w", addr, err)
		}
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Endpoint, err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(logCalls))
	csi.RegisterIdentityServer(srv, IdentityServer{d: d})
	csi.RegisterControllerServer(srv, ControllerServer{d: d})
	csi.RegisterNodeServer(srv, NodeServer{d: d})

	var https []*http.Server
	if cfg.MetricsAddress != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(metrics.NewCollector(d.opts.NodeID, d.statuses).WithPools(d.poolWipes).WithBudget(d.budgetFigures).WithRecovering(d.recoveringIDs))
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		https = append(https, &http.Server{Addr: cfg.MetricsAddress, Handler: mux, ReadHeaderTimeout: 10 * time.Second})
	}
	if cfg.HealthAddress != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if err := d.Ready(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		https = append(https, &http.Server{Addr: cfg.HealthAddress, Handler: mux, ReadHeaderTimeout: 10 * time.Second})
	}
	for _, h := range https {
		go func() {
			if err := h.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "HTTP listener failed", "address", h.Addr)
			}
		}()
	}
	klog.InfoS("CSI plugin serving", "driver", Name, "version", d.opts.Version, "node", d.opts.NodeID,
		"endpoint", cfg.Endpoint, "hdd", d.opts.HDD.String(), "nvme", d.opts.NVMe.String(), "metrics", cfg.MetricsAddress)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	readopted := make(chan struct{})
	go func() {
		defer close(readopted)
		if err := d.finishReadopt(ctx, staged); err != nil {
			// Volumes that could not come back report an abnormal
			// condition; kubelet's next NodeStageVolume tries again.
			klog.ErrorS(err, "Some staged volumes were not re-adopted")
		}
	}()
	select {
	case <-ctx.Done():
		klog.InfoS("Stopping: finishing calls, flushing every volume")
	case err = <-serveErr:
		klog.ErrorS(err, "gRPC server stopped")
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		srv.Stop()
	}
	for _, h := range https {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = h.Shutdown(sctx)
		cancel()
	}
	// ctx has ended: recoveries still running stop at their next step.
	<-readopted
	if serr := d.Shutdown(); serr != nil {
		return errors.Join(err, fmt.Errorf("shutdown: %w", serr))
	}
	klog.InfoS("Stopped; every volume flushed")
	return err
}

func (d *Driver) statuses() map[string]engine.Status {
	out := map[string]engine.Status{}
	for _, id := range d.opts.Runtime.IDs() {
		if info, ok := d.opts.Runtime.Get(id); ok {
			out[id] = info.Status
		}
	}
	return out
}

// Prestop flushes every staged volume of a running plugin through the
// volumes' control sockets (the preStop hook runs in another process).
func Prestop(ctx context.Context, stateDir, runDir string) error {
	st, err := nodestate.Open(stateDir)
	if err != nil {
		return err
	}
	var errs []error
	n := 0
	for _, v := range st.List() {
		if v.Staged == nil {
			continue
		}
		n++
		if err := volume.FlushViaControl(ctx, runDir, v.ID); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", v.ID, err))
			continue
		}
		klog.InfoS("Flushed", "volume", v.ID)
	}
	klog.InfoS("preStop done", "staged", n, "failed", len(errs))
	return errors.Join(errs...)
}
