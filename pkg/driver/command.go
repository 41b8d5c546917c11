package driver

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
)

// NewCommand returns the `csi` command (with its `prestop` and hidden
// `nbd-relay` subcommands). It lives here rather than in cmd/writeboost so
// that the tests of test/csi can run the very same command from their own
// binary.
func NewCommand(version string) *cobra.Command {
	cfg := Config{Version: version}
	cmd := &cobra.Command{
		Use:   "csi",
		Short: "Run the CSI node plugin " + Name,
		Long: `Run the Kubernetes CSI plugin writeboost.csi.io on this node: Identity, Controller
(for this node's own volumes, with csi-provisioner in --node-deployment mode) and
Node services on --endpoint. Each volume is a backing volume on the HDD pool and
a cache slice on the NVMe pool, served by the cache engine in this process.

Minimal local run:
  writeboost csi --endpoint unix:///tmp/csi.sock --node-id node1 \
    --hdd-pool /mnt/hdd/wb --nvme-pool /mnt/nvme/wb --state-dir /var/lib/writeboost`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			cfg.RelayCommand = []string{exe, "csi", attach.RelayCommandName}
			if !cmd.Flags().Changed("max-volumes") {
				cfg.MaxVolumes = 0 // the config file's maxVolumes, else 64
			}
			d, err := Build(cfg)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return d.Serve(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Endpoint, "endpoint", "unix:///csi/csi.sock", "CSI gRPC endpoint (unix:///path, or tcp://host:port explicitly)")
	f.StringVar(&cfg.NodeID, "node-id", "", "this node's name (usually $(NODE_NAME))")
	f.StringVar(&cfg.ConfigFile, "config", "", "config file (pools and limits; YAML)")
	f.StringVar(&cfg.HDDPool, "hdd-pool", "", "directory of the HDD pool (overrides the config file)")
	f.StringVar(&cfg.NVMePool, "nvme-pool", "", "directory of the NVMe pool (overrides the config file)")
	f.StringVar(&cfg.StateDir, "state-dir", "/var/lib/writeboost", "node state (must survive pod restarts)")
	f.StringVar(&cfg.RunDir, "run-dir", "/run/writeboost", "RAM buffers and private sockets (tmpfs that outlives the pod)")
	f.StringVar(&cfg.MetricsAddress, "metrics-address", "", "Prometheus /metrics listen address; empty = off")
	f.StringVar(&cfg.HealthAddress, "health-address", "", "HTTP /healthz listen address; empty = off")
	f.IntVar(&cfg.MaxVolumes, "max-volumes", 64, "volumes this node accepts (overrides the config file's maxVolumes)")
	f.DurationVar(&cfg.CacheReadDelay, "debug-cache-read-delay", 0, "tests: delay every cache device read by this much (a slow recovery)")
	_ = f.MarkHidden("debug-cache-read-delay")
	f.StringVar(&cfg.AttachMethod, "debug-attach-method", "", "tests: force an attach method ("+attach.MethodNetlink+", "+attach.MethodFallback+")")
	_ = f.MarkHidden("debug-attach-method")
	cmd.AddCommand(newPrestopCommand(), attach.NewRelayCommand(), newParamsCommand())
	return cmd
}

func newPrestopCommand() *cobra.Command {
	var stateDir, runDir string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "prestop",
		Short: "Flush every staged volume of the running plugin (a preStop hook)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			return Prestop(ctx, stateDir, runDir)
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", "/var/lib/writeboost", "the plugin's --state-dir")
	cmd.Flags().StringVar(&runDir, "run-dir", "/run/writeboost", "the plugin's --run-dir")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up after this long")
	return cmd
}

func newParamsCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "params",
		Short: "Print the StorageClass parameters as a Markdown table (for the README)",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprint(cmd.OutOrStdout(), params.Markdown())
		},
	}
}
