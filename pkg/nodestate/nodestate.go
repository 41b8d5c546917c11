// Package nodestate keeps the CSI plugin's record of the node's volumes on
// disk: which volumes were created here (and with which parameters), and
// which are staged (so a restarted plugin can re-adopt them: recover each
// engine, serve it and reattach its device while pods keep running).
//
// The record is one JSON file, replaced atomically on every change: written
// to a temporary file, fsynced, renamed over the old one, and the directory
// fsynced, so a crash at any point leaves either the old or the new record,
// never a torn one.
package nodestate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// Volume is what the node knows about one volume.
type Volume struct {
	ID        string            `json:"id"`
	Name      string            `json:"name,omitempty"`
	Capacity  int64             `json:"capacity"`
	CacheSize int64             `json:"cacheSize"`
	Params    map[string]string `json:"params,omitempty"`
	// BackingDevice is set for static volumes whose backing is an existing
	// block device rather than a pool volume.
	BackingDevice string `json:"backingDevice,omitempty"`
	Staged        *Stage `json:"staged,omitempty"`
	// GrowFS is set when the backing grew while unstaged: the next stage
	// grows the filesystem before mounting it.
	GrowFS bool `json:"growFS,omitempty"`
}

// Stage records a staged volume.
type Stage struct {
	StagingPath string   `json:"stagingPath"`
	Block       bool     `json:"block"`
	FSType      string   `json:"fsType,omitempty"`
	MountFlags  []string `json:"mountFlags,omitempty"`
	Device      string   `json:"device"`
	BackingPath string   `json:"backingPath"`
	CachePath   string   `json:"cachePath"`
}

// Store is the on-disk record, safe for concurrent use.
type Store struct {
	path string
	mu   sync.Mutex
	vols map[string]Volume
}

const fileName = "volumes.json"

type onDisk struct {
	Version int               `json:"version"`
	Volumes map[string]Volume `json:"volumes"`
}

// Open loads the record in dir, creating dir when missing.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("nodestate: %w", err)
	}
	s := &Store{path: filepath.Join(dir, fileName), vols: map[string]Volume{}}
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("nodestate: %w", err)
	}
	var d onDisk
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("nodestate: %s is corrupt: %w", s.path, err)
	}
	if d.Version != 1 {
		return nil, fmt.Errorf("nodestate: %s has version %d, this plugin reads 1", s.path, d.Version)
	}
	// Records are found by the key and used by their id: a record whose
	// id differs from its key (or a null record) would be looked up under
	// one volume and act on another.
	for id, v := range d.Volumes {
		if v.ID != id || id == "" {
			return nil, fmt.Errorf("nodestate: %s is corrupt: the record under %q has id %q", s.path, id, v.ID)
		}
	}
	if d.Volumes != nil {
		s.vols = d.Volumes
	}
	return s, nil
}

// Get returns the record of id.
func (s *Store) Get(id string) (Volume, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vols[id]
	return v, ok
}

// List returns every record.
func (s *Store) List() []Volume {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Volume, 0, len(s.vols))
	for _, v := range s.vols {
		out = append(out, v)
	}
	return out
}

// Put stores v durably.
func (s *Store) Put(v Volume) error {
	if v.ID == "" {
		// Open refuses a record without id; never write one.
		return errors.New("nodestate: volume record without id")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.vols[v.ID]
	s.vols[v.ID] = v
	if err := s.saveLocked(); err != nil {
		if had {
			s.vols[v.ID] = old
		} else {
			delete(s.vols, v.ID)
		}
		return err
	}
	return nil
}

// Delete removes id durably.
func (s *Store) Delete(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.vols[id]
	if !had {
		return nil
	}
	delete(s.vols, id)
	if err := s.saveLocked(); err != nil {
		s.vols[id] = old
		return err
	}
	return nil
}

func (s *Store) saveLocked() error {
	b, err := json.MarshalIndent(onDisk{Version: 1, Volumes: s.vols}, "", "  ")
	if err != nil {
		return err
	}
	return WriteFileAtomic(s.path, b, 0o600)
}

// WriteFileAtomic replaces path with data: temp file, fsync, rename, fsync
// of the directory.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("nodestate: %w", err)
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("nodestate: write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Chmod(mode); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("nodestate: write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("nodestate: rename %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("nodestate: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("nodestate: fsync %s: %w", dir, err)
	}
	return nil
}
