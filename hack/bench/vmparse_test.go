package main

import (
	"encoding/binary"
	"os"
	"reflect"
	"testing"
)

func TestParseWriteboostStatus(t *testing.T) {
	// dm-writeboost 2.2.17's STATUSTYPE_INFO: 7 fields, 16 counters,
	// partial flushes, then "10" and five tunables as key value pairs.
	line := "0 2097152 writeboost 3 16256 127 130 129 2 9000 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 10 writeback_threshold 70 nr_cur_batched_writeback 32 sync_data_interval 0 update_sb_record_interval 0 read_cache_threshold 0"
	s, err := parseWriteboostStatus(line)
	if err != nil {
		t.Fatal(err)
	}
	want := WriteboostStatus{NrCacheBlocks: 16256, NrSegments: 127, CurrentID: 130, LastFlushedID: 129, LastWritebackID: 2, NrDirty: 9000}
	if s != want {
		t.Fatalf("got %+v, want %+v", s, want)
	}
	if _, err := parseWriteboostStatus("0 2097152 writecache 0 1 2 3"); err == nil {
		t.Fatal("accepted another target's status")
	}
	if _, err := parseWriteboostStatus("0 2097152 writeboost 3 16256 127"); err == nil {
		t.Fatal("accepted a truncated status")
	}
	if _, err := parseWriteboostStatus("0 2097152 writeboost 3 16256 127 x 129 2 9000"); err == nil {
		t.Fatal("accepted a non-numeric field")
	}
}

func TestParseWritecacheStatus(t *testing.T) {
	// 6.1 appends statistics after the four fields.
	s, err := parseWritecacheStatus("0 2097152 writecache 0 16128 4000 12 10 5 3000 1 2 0 0 7 0")
	if err != nil {
		t.Fatal(err)
	}
	if want := (WritecacheStatus{Error: 0, Total: 16128, Free: 4000, Writeback: 12}); s != want {
		t.Fatalf("got %+v, want %+v", s, want)
	}
	if s.Used() != 12128 {
		t.Fatalf("used %d", s.Used())
	}
	if _, err := parseWritecacheStatus("0 2097152 writecache 0 16128"); err == nil {
		t.Fatal("accepted a truncated status")
	}
	if (WritecacheStatus{Total: 1, Free: 5}).Used() != 0 {
		t.Fatal("used underflows")
	}
}

func TestParseBcacheSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "512": 512, "12.5k\n": 12800, "3.0M": 3 << 20, "1.5G": 3 << 29, " 2k ": 2048,
	} {
		got, err := parseBcacheSize(in)
		if err != nil || got != want {
			t.Errorf("parseBcacheSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1k", "abc", "1.0X"} {
		if _, err := parseBcacheSize(in); err == nil {
			t.Errorf("parseBcacheSize(%q) accepted", in)
		}
	}
}

func TestParseFioIOPSLog(t *testing.T) {
	// Two directions in the first second, a late sample in the third,
	// nothing in the second; fio 3.33 prints 5 fields, later ones 6.
	log := "1000, 120, 0, 4096, 0\n1000, 40, 1, 4096, 0\n3001, 7, 1, 4096, 0, 0\n3000, 3, 1, 4096, 0\n\n"
	got, err := parseFioIOPSLog(log)
	if err != nil {
		t.Fatal(err)
	}
	if want := []float64{160, 0, 3, 7}; !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if got, err := parseFioIOPSLog(""); err != nil || len(got) != 0 {
		t.Fatalf("empty log: %v, %v", got, err)
	}
	for _, bad := range []string{"1000", "x, 1, 0", "1000, -1, 0", "1000, y, 0"} {
		if _, err := parseFioIOPSLog(bad); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestParseProcStat(t *testing.T) {
	c, err := parseProcStat("cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 5 0 10 150 2 2 3 3 0 0\nintr 1\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Busy() != 10+1+20+5+6+7 || c.Total() != c.Busy()+300+4 {
		t.Fatalf("got %+v busy %d total %d", c, c.Busy(), c.Total())
	}
	if _, err := parseProcStat("cpu0 1 2 3 4 5 6 7 8\n"); err == nil {
		t.Fatal("accepted a per-CPU line for the aggregate")
	}
	if _, err := parseProcStat("cpu 1 2 3\n"); err == nil {
		t.Fatal("accepted a short line")
	}
}

func TestParseProcPidStat(t *testing.T) {
	// A command name with a space and a parenthesis.
	line := "4242 (wb (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 321 123 0 0 20 0 9 0 555 0 0\n"
	u, s, err := parseProcPidStat(line)
	if err != nil || u != 321 || s != 123 {
		t.Fatalf("got %d %d %v", u, s, err)
	}
	if _, _, err := parseProcPidStat("4242 (x) S 1 2"); err == nil {
		t.Fatal("accepted a short line")
	}
}

func TestWriteMBR(t *testing.T) {
	path := t.TempDir() + "/disk.img"
	const size = 3 << 20
	if err := writeMBR(path, 4, size); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 1<<20+4*size {
		t.Fatalf("image is %d bytes", len(b))
	}
	if b[510] != 0x55 || b[511] != 0xaa {
		t.Fatal("no boot signature")
	}
	for i := 0; i < 4; i++ {
		e := b[446+16*i:]
		start, n := binary.LittleEndian.Uint32(e[8:]), binary.LittleEndian.Uint32(e[12:])
		if e[4] != 0x83 || int64(start)*512 != 1<<20+int64(i)*size || int64(n)*512 != size {
			t.Errorf("partition %d: type %#x start %d sectors %d", i+1, e[4], start, n)
		}
	}
	for _, bad := range []struct {
		n    int
		size int64
	}{{0, size}, {5, size}, {1, 1000}, {4, 1 << 40}} {
		if err := writeMBR(t.TempDir()+"/x.img", bad.n, bad.size); err == nil {
			t.Errorf("writeMBR(%d, %d) accepted", bad.n, bad.size)
		}
	}
}

func TestBcacheBucket(t *testing.T) {
	for _, c := range []struct{ size, want int64 }{
		{32 << 20, 32 << 10}, // 512 buckets of 64 KiB: refused by the kernel
		{64 << 20, 64 << 10},
		{1 << 30, 64 << 10},
		{1 << 20, 4 << 10},
	} {
		if got := bcacheBucket(c.size); got != c.want {
			t.Errorf("bcacheBucket(%d) = %d, want %d", c.size, got, c.want)
		}
	}
}
