package main

import (
	"github.com/spf13/cobra"

	"github.com/writeboost-csi/writeboost-csi/pkg/driver"
)

// newCSICommand is `writeboost csi` (the CSI plugin) with its `prestop`
// subcommand; the logic lives in pkg/driver.
func newCSICommand() *cobra.Command { return driver.NewCommand(version) }
