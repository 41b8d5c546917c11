package attach

import (
	"context"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"
)

// RelayCommandName is the name of the relay's (hidden) command under
// whichever parent runs it: `writeboost nbd-relay` for attach and serve,
// `writeboost csi nbd-relay` for the CSI plugin. Options.RelayCommand names
// the program and parents; relayArgs adds the flags below.
const RelayCommandName = "nbd-relay"

// NewRelayCommand is the one definition of the relay command that nbdfuse
// runs in command mode (see relay.go): NBD on stdin/stdout, forwarded to
// the server's socket, reconnecting across restarts of the server.
func NewRelayCommand() *cobra.Command {
	var socket, export string
	var deadConn time.Duration
	var ceiling uint64
	cmd := &cobra.Command{
		Use:    RelayCommandName + " --socket PATH",
		Short:  "Relay NBD between stdin/stdout and a server, reconnecting across its restarts (used by attach)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Logs must not go to stdout: that is the NBD stream.
			klog.LogToStderr(true)
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			return ServeRelay(ctx, RelayStdio(), socket, export, deadConn, ceiling)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&socket, "socket", "", "NBD server's unix socket (required)")
	fl.StringVar(&export, "export", "", "export name")
	fl.DurationVar(&deadConn, "dead-conn-timeout", 2*time.Minute, "how long to keep redialling a vanished server before failing")
	fl.Uint64Var(&ceiling, "ceiling", 0, "size to advertise when above the export's (the fallback's room to grow); 0: the export's size")
	_ = cmd.MarkFlagRequired("socket")
	return cmd
}
