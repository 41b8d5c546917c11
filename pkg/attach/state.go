package attach

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// state is what survives a restart of the attaching process: enough to find
// and detach (or reattach) an attachment. One JSON file per volume.
type state struct {
	Attachment
	// Fallback path only.
	MountDir    string `json:"mountDir,omitempty"`
	BackingFile string `json:"backingFile,omitempty"`
	NbdfusePID  int    `json:"nbdfusePid,omitempty"`
	// Ceiling is the size of nbdfuse's file: the most the loop device's
	// sizelimit can grow to without a new attach (Resize). 0 in records
	// made before online growth: such a device cannot grow.
	Ceiling int64 `json:"ceiling,omitempty"`
}

// stateName maps a volume id to a file name; ids may hold characters that
// are not file-name safe, so every other byte is escaped as %xx. Escaping
// bytes (not runes) keeps the mapping one-to-one: two ids never share a
// record. A leading dot is escaped too, so no record is a hidden file
// (which findStateByDevice skips as temporary).
func stateName(volumeID string) string {
	var b strings.Builder
	for i := 0; i < len(volumeID); i++ {
		switch c := volumeID[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.' && i > 0:
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02x", c)
		}
	}
	return b.String() + ".json"
}

// saveState writes the state atomically: temp file, fsync, rename, fsync of
// the directory, so a crash leaves either the old or the new file.
func saveState(dir string, s *state) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	final := filepath.Join(dir, stateName(s.VolumeID))
	tmp, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("state: write: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("state: fsync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("state: close: %w", err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("state: rename: %w", err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

func loadState(dir, volumeID string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateName(volumeID)))
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state of volume %q: %w", volumeID, err)
	}
	if s.VolumeID != volumeID {
		// Acting on it would detach or reattach another volume's device.
		return nil, fmt.Errorf("state of volume %q: the record is for volume %q", volumeID, s.VolumeID)
	}
	return &s, nil
}

func removeState(dir, volumeID string) error {
	err := os.Remove(filepath.Join(dir, stateName(volumeID)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir(dir)
}

// findStateByDevice scans the state dir for the attachment of device.
func findStateByDevice(dir, device string) (*state, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var s state
		if json.Unmarshal(b, &s) == nil && s.Device == device {
			return &s, nil
		}
	}
	return nil, fmt.Errorf("no attachment of %s recorded in %s: %w", device, dir, os.ErrNotExist)
}

// lockVolume serialises attach, detach and reattach of one volume across
// goroutines and processes (an flock on a per-volume lock file), so two
// concurrent calls cannot both decide the volume is unattached.
func lockVolume(ctx context.Context, dir, volumeID string) (func(), error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	p := filepath.Join(dir, "."+strings.TrimSuffix(stateName(volumeID), ".json")+".lock")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", p, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock volume %q: %w", volumeID, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
