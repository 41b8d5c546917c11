package nodestate

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// FuzzOpen feeds arbitrary bytes as the record a restarted plugin reloads
// (a disk error, a hand edit, a file from another version). Open must
// either refuse it with an error naming the file, or load records that are
// consistent (each stored under its own id) and that survive being saved
// and reloaded unchanged.
func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	s, err := Open(dir)
	if err != nil {
		f.Fatal(err)
	}
	for _, v := range []Volume{
		{ID: "a", Name: "pvc-1", Capacity: 1 << 30, CacheSize: 1 << 26, Params: map[string]string{"cacheSize": "64Mi"},
			Staged: &Stage{StagingPath: "/s", FSType: "xfs", Device: "/dev/loop3", MountFlags: []string{"noatime"},
				BackingPath: "/pool/a.img", CachePath: "/nvme/a.cache"}},
		{ID: "static/dev", BackingDevice: "/dev/sdb", Capacity: 4096, GrowFS: true},
		{ID: "b", Staged: &Stage{Block: true, Device: "/dev/nbd0"}},
	} {
		if err := s.Put(v); err != nil {
			f.Fatal(err)
		}
	}
	good, err := os.ReadFile(filepath.Join(dir, fileName))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2]) // torn by something other than our atomic write
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":2,"volumes":{}}`))
	f.Add([]byte(`{"version":1,"volumes":{"a":{"id":"b"}}}`))
	f.Add([]byte(`{"version":1,"volumes":{"a":null}}`))
	f.Add([]byte(`{"version":1,"volumes":{"a":{"id":"a","params":{},"staged":{"mountFlags":[]}}}}`))
	f.Add([]byte{})
	f.Add([]byte("null"))
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		path := filepath.Join(dir, fileName)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir)
		if err != nil {
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q does not name the file %s", err, path)
			}
			return
		}
		vols := s.List()
		for _, v := range vols {
			if got, ok := s.Get(v.ID); !ok || !reflect.DeepEqual(got, v) {
				t.Fatalf("record %+v is not found under its id %q (got %+v)", v, v.ID, got)
			}
		}
		// Saving what was loaded and loading it again gives the same
		// records: the file format has one meaning.
		if len(vols) > 0 {
			if err := s.Put(vols[0]); err != nil {
				t.Fatal(err)
			}
		}
		s2, err := Open(dir)
		if err != nil {
			saved, _ := os.ReadFile(path)
			t.Fatalf("record loaded from %q, saved as %q, is refused: %v", b, saved, err)
		}
		if a, b := canon(vols), canon(s2.List()); !reflect.DeepEqual(a, b) {
			t.Fatalf("records %+v reload as %+v", a, b)
		}
		if len(vols) > 0 {
			if saved, _ := os.ReadFile(path); !bytes.Contains(saved, []byte(`"version": 1`)) {
				t.Fatalf("saved record %q has no version 1", saved)
			}
		}
	})
}

// canon sorts records by id and drops the difference between empty and
// absent maps and lists, which JSON's omitempty does not keep.
func canon(vols []Volume) []Volume {
	out := make([]Volume, len(vols))
	for i, v := range vols {
		if len(v.Params) == 0 {
			v.Params = nil
		}
		if v.Staged != nil {
			st := *v.Staged
			if len(st.MountFlags) == 0 {
				st.MountFlags = nil
			}
			v.Staged = &st
		}
		out[i] = v
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
