package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/writeboost-csi/writeboost-csi/pkg/control"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// defaultDataDir holds serve's default images and sockets.
const defaultDataDir = "writeboost-data"

var defaultControlPath = filepath.Join(defaultDataDir, "control.sock")

func addControlFlag(cmd *cobra.Command, path *string) {
	cmd.Flags().StringVar(path, "control", defaultControlPath, "control socket of the running `writeboost serve`")
}

// signalContext is cancelled by SIGINT/SIGTERM, so Ctrl-C on a drain stops
// the drain on the server too.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}

func newStatusCommand() *cobra.Command {
	var path string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the status of a running cache (dm-writeboost's fields and more)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			c := control.NewClient(path)
			defer c.Close()
			if asJSON {
				raw, err := c.StatusRaw(ctx)
				if err != nil {
					return err
				}
				var out bytes.Buffer
				if err := json.Indent(&out, raw, "", "  "); err != nil {
					return fmt.Errorf("status reply: %w", err)
				}
				out.WriteByte('\n')
				_, err = cmd.OutOrStdout().Write(out.Bytes())
				return err
			}
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			return control.WriteStatus(cmd.OutOrStdout(), st)
		},
	}
	addControlFlag(cmd, &path)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON (keys are dm-writeboost's snake_case names)")
	return cmd
}

func tunableHelp() string {
	var b bytes.Buffer
	for _, s := range engine.TunableSpecs {
		online := ""
		if !s.Online {
			online = ", static: only at start"
		}
		fmt.Fprintf(&b, "  %-26s %d..%d %s (default %d%s)\n", s.Name, s.Min, s.Max, s.Unit, s.Default, online)
	}
	return b.String()
}

func newSetCommand() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "set KEY=VALUE...",
		Short: "Change tunables of a running cache",
		Long: "Change tunables of a running cache. Every setting is validated before any is\n" +
			"applied. Tunables:\n" + tunableHelp(),
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			settings, err := control.ParseSettings(args)
			if err != nil {
				return err
			}
			if err := control.ValidateSettings(settings); err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			c := control.NewClient(path)
			defer c.Close()
			t, err := c.Set(ctx, settings)
			if err != nil {
				return err
			}
			for _, kv := range t.Map() {
				fmt.Fprintf(cmd.OutOrStdout(), "%s=%s\n", kv[0], kv[1])
			}
			return nil
		},
	}
	addControlFlag(cmd, &path)
	return cmd
}

func newDrainCommand() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "drain",
		Short: "Write back every dirty block, the RAM buffer included; returns when nothing is dirty",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			c := control.NewClient(path)
			defer c.Close()
			bar := newProgressBar(cmd.OutOrStdout(), "blocks written back")
			var last engine.DrainProgress
			err := c.Drain(ctx, func(p engine.DrainProgress) {
				last = p
				bar.update(p.WrittenBlocks, p.InitialDirty)
			})
			bar.finish()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "drained: %d blocks written back, nothing dirty\n", last.WrittenBlocks)
			return nil
		},
	}
	addControlFlag(cmd, &path)
	return cmd
}

func newClearStatCommand() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "clear-stat",
		Short: "Reset the hit/miss counters of a running cache",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			c := control.NewClient(path)
			defer c.Close()
			return c.ClearStat(ctx)
		},
	}
	addControlFlag(cmd, &path)
	return cmd
}

func newFlushCommand() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "flush",
		Short: "Make every acknowledged write of a running cache durable on the cache device",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			c := control.NewClient(path)
			defer c.Close()
			return c.Flush(ctx)
		},
	}
	addControlFlag(cmd, &path)
	return cmd
}
