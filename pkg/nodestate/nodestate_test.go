package nodestate

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestPersistAndReload(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v := Volume{ID: "a", Name: "pvc-1", Capacity: 1 << 20, CacheSize: 1 << 16, Params: map[string]string{"k": "v"},
		Staged: &Stage{StagingPath: "/s", Device: "/dev/loop3", MountFlags: []string{"noatime"}}}
	if err := s.Put(v); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Volume{ID: "b"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("b"); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := s2.Get("a")
	if !ok || !reflect.DeepEqual(got, v) {
		t.Fatalf("reloaded %+v, want %+v", got, v)
	}
	if _, ok := s2.Get("b"); ok {
		t.Fatal("deleted volume came back")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
}

func TestCorruptRefused(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, fileName), []byte("{not json"), 0o600)
	if _, err := Open(dir); err == nil {
		t.Fatal("corrupt state accepted")
	}
}
