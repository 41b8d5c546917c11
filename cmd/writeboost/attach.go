package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
)

// defaultAttachStateDir holds attachment records; /run so they vanish with
// the attachments themselves at reboot.
const defaultAttachStateDir = "/run/writeboost/attach"

type attachFlags struct {
	socket, export, volumeID, stateDir, method string
	timeout, deadConn                          time.Duration
	connections                                int
	readOnly, noRelay                          bool
}

func (f *attachFlags) options() (attach.Options, error) {
	sock, err := filepath.Abs(f.socket)
	if err != nil {
		return attach.Options{}, err
	}
	vol := f.volumeID
	if vol == "" {
		vol = sock // one served volume per socket
	}
	var relay []string
	if !f.noRelay {
		exe, err := os.Executable()
		if err != nil {
			return attach.Options{}, fmt.Errorf("find own executable for the relay: %w", err)
		}
		// On the nbdfuse path, talk through "writeboost nbd-relay" so the
		// device survives a restart of the server.
		relay = []string{exe, attach.RelayCommandName}
	}
	return attach.Options{
		Socket: sock, Export: f.export, VolumeID: vol, StateDir: f.stateDir,
		Timeout: f.timeout, DeadConnTimeout: f.deadConn, Connections: f.connections,
		PreferMethod: f.method, ReadOnly: f.readOnly,
		RelayCommand: relay,
	}, nil
}

func newAttachCommand() *cobra.Command {
	f := &attachFlags{}
	cmd := &cobra.Command{
		Use:   "attach --socket PATH [--export NAME]",
		Short: "Attach an NBD export as a local block device and print its path",
		Long: `Attach an NBD export served on a unix socket as a block device.

With the kernel nbd driver the device is /dev/nbdX (configured over netlink,
so it outlives this command; "writeboost reattach" hands it new connections
after the server restarts). Without it, nbdfuse and a loop device provide
/dev/loopX; nbdfuse reaches the server through "writeboost nbd-relay", which
reconnects by itself when the server restarts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := f.options()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			a, err := attach.Attach(ctx, o)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), a.Device)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.socket, "socket", "", "NBD server's unix socket (required)")
	fl.StringVar(&f.export, "export", "", "export name")
	fl.StringVar(&f.volumeID, "volume-id", "", "volume id, the device's backend identifier (default: the socket's absolute path)")
	fl.StringVar(&f.stateDir, "state-dir", defaultAttachStateDir, "directory for attachment records")
	fl.StringVar(&f.method, "method", "", `force a method: "kernel-netlink", "kernel-ioctl" or "nbdfuse-loop" (default: best available)`)
	fl.DurationVar(&f.timeout, "timeout", 30*time.Second, "kernel I/O timeout per request; also bounds setup")
	fl.DurationVar(&f.deadConn, "dead-conn-timeout", 2*time.Minute, "how long the kernel holds I/O for a reattach when the server goes away")
	fl.IntVar(&f.connections, "connections", 0, "connections when the server allows several (default: min(CPUs, 4))")
	fl.BoolVar(&f.readOnly, "read-only", false, "attach read-only")
	fl.BoolVar(&f.noRelay, "no-relay", false, "nbdfuse path: connect nbdfuse to the server directly (slightly faster; the device then dies with the server's connection)")
	_ = cmd.MarkFlagRequired("socket")
	return cmd
}

func newDetachCommand() *cobra.Command {
	var stateDir string
	cmd := &cobra.Command{
		Use:   "detach DEVICE",
		Short: "Detach a device made by attach (unmount it first)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			return attach.Detach(ctx, stateDir, args[0])
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", defaultAttachStateDir, "directory for attachment records")
	return cmd
}

func newReattachCommand() *cobra.Command {
	f := &attachFlags{}
	cmd := &cobra.Command{
		Use:   "reattach --socket PATH [--volume-id ID]",
		Short: "Hand a kernel nbd device fresh connections after its server restarted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := f.options()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			a, err := attach.Reattach(ctx, o.StateDir, o.VolumeID, attach.UnixDialer(o.Socket, o.Export, o.Timeout), o)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), a.Device)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.socket, "socket", "", "NBD server's unix socket (required)")
	fl.StringVar(&f.export, "export", "", "export name")
	fl.StringVar(&f.volumeID, "volume-id", "", "volume id given to attach (default: the socket's absolute path)")
	fl.StringVar(&f.stateDir, "state-dir", defaultAttachStateDir, "directory for attachment records")
	fl.DurationVar(&f.timeout, "timeout", 30*time.Second, "handshake timeout")
	fl.DurationVar(&f.deadConn, "dead-conn-timeout", 2*time.Minute, "new dead-connection timeout")
	fl.IntVar(&f.connections, "connections", 0, "connections to offer (surplus ones are refused by the kernel)")
	_ = cmd.MarkFlagRequired("socket")
	return cmd
}
