// Command writeboost is the one binary of writeboost-csi: the standalone
// cached NBD server (serve), its control commands (status, set, drain,
// clear-stat, flush), the offline tools for a cache device (check, dump),
// attaching a served volume as a block device (attach, detach) and the
// Kubernetes CSI node plugin (csi).
//
// This file only wires the commands together; each lives in its own file
// and its logic in a package under pkg/.
package main

import (
	goflag "flag"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
)

// version is set at build time: go build -ldflags "-X main.version=v1.2.3".
var version = "dev"

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "writeboost",
		Short: "A log-structured write-back cache for block devices, served over NBD",
		Long: `writeboost pairs a fast cache device (NVMe) with a slow backing device (HDD)
through a crash-safe log-structured write-back cache in the style of
dm-writeboost, and serves the result as a network block device.

Start with "writeboost serve": with no arguments it serves a cached volume on
image files under ./writeboost-data/ and prints how to connect to it.`,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	// klog's flags (-v, --vmodule, --log_file, ...) on every command.
	klogFlags := goflag.NewFlagSet("klog", goflag.ContinueOnError)
	klog.InitFlags(klogFlags)
	root.PersistentFlags().AddGoFlagSet(klogFlags)
	// Keep --help readable: show the klog flags people use, accept all.
	klogFlags.VisitAll(func(f *goflag.Flag) {
		switch f.Name {
		case "v", "vmodule", "log_file", "logtostderr":
		default:
			_ = root.PersistentFlags().MarkHidden(f.Name)
		}
	})

	root.AddCommand(
		newServeCommand(),
		newStatusCommand(),
		newSetCommand(),
		newDrainCommand(),
		newClearStatCommand(),
		newFlushCommand(),
		newCheckCommand(),
		newDumpCommand(),
		newVersionCommand(),
		newAttachCommand(),
		newDetachCommand(),
		newReattachCommand(),
		attach.NewRelayCommand(),
		newCSICommand(),
	)
	return root
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), version)
		},
	}
}

func main() {
	err := newRootCommand().Execute()
	klog.Flush()
	if err != nil {
		fmt.Fprintf(os.Stderr, "writeboost: %v\n", err)
		os.Exit(exitCode(err))
	}
}
