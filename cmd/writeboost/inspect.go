package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/pkg/inspect"
)

// openCacheReadOnly opens a cache device for the offline tools and warns
// when a running server holds it (what it reads may then be mid-update).
func openCacheReadOnly(path string, stderr io.Writer) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("open cache: %w", err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("size of %s: %w", path, err)
	}
	if unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB) != nil {
		fmt.Fprintf(stderr, "warning: %s is in use by a running writeboost; the log may change while it is read\n", path)
	}
	return f, size, nil
}

func newCheckCommand() *cobra.Command {
	var cache string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "check --cache PATH",
		Short: "Verify a cache device offline: superblocks, checkpoints, every live segment's checksums",
		Long: `Verify a cache device offline: both superblock copies, both checkpoint slots,
and the header and data checksum of every segment of the live log (from
last_writeback_id+1 to its end). Exits 0 when healthy, 1 on corruption, 2 when
the device cannot be checked at all. A torn tail segment after an unclean
shutdown is reported but is not corruption: recovery drops it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, size, err := openCacheReadOnly(cache, cmd.ErrOrStderr())
			if err != nil {
				return &exitError{2, err}
			}
			defer f.Close()
			bar := newProgressBar(cmd.ErrOrStderr(), "segments")
			bar.quiet = !bar.tty // plain lines only help on long checks
			rep, err := inspect.Check(f, size, inspect.Options{Progress: bar.update})
			bar.finish()
			if err != nil {
				return &exitError{2, fmt.Errorf("check %s: %w", cache, err)}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				rep.WriteText(cmd.OutOrStdout())
			}
			if rep.Corrupt() {
				return &exitError{1, fmt.Errorf("%s: %d problem(s): %s", cache, len(rep.Problems), rep.Problems[0])}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cache, "cache", "", "cache device or image")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	_ = cmd.MarkFlagRequired("cache")
	return cmd
}

func newDumpCommand() *cobra.Command {
	var cache string
	var segment uint64
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "dump --cache PATH [--segment ID]",
		Short: "Show a cache device's superblock, checkpoint, live log, or one segment's metablocks",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, size, err := openCacheReadOnly(cache, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer f.Close()
			rep, err := inspect.Check(f, size, inspect.Options{})
			if err != nil {
				return fmt.Errorf("dump %s: %w", cache, err)
			}
			out := cmd.OutOrStdout()
			if segment != 0 {
				s, err := inspect.Segment(f, *rep.Superblock, segment)
				if err != nil {
					return err
				}
				if asJSON {
					return writeIndented(out, s)
				}
				inspect.WriteSegmentText(out, s)
				return nil
			}
			if asJSON {
				return writeIndented(out, rep)
			}
			rep.WriteText(out)
			for _, s := range rep.Live {
				fmt.Fprintf(out, "  segment %d: slot %d, epoch %d, %d metablocks (%d data, %d discard)\n",
					s.ID, s.Slot, s.Epoch, s.Count, s.DataBlocks, s.Discards)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cache, "cache", "", "cache device or image")
	cmd.Flags().Uint64Var(&segment, "segment", 0, "show this segment's header and metablocks")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	_ = cmd.MarkFlagRequired("cache")
	return cmd
}

func writeIndented(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
