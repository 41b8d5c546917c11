package layout

import "testing"

// BenchmarkDataCRC measures the data checksum of a default segment's
// data blocks, which every segment write and every recovered-but-not-yet-
// flushed segment pays; compare its MB/s with BenchmarkCopySegment.
func BenchmarkDataCRC(b *testing.B) {
	data := make([]byte, DefaultSegmentSize-BlockSize)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		c := uint32(0)
		for i := 0; i < len(data); i += BlockSize {
			c = UpdateDataCRC(c, data[i:i+BlockSize])
		}
		_ = c
	}
}

// BenchmarkCopySegment is the memory bandwidth baseline for BenchmarkDataCRC.
func BenchmarkCopySegment(b *testing.B) {
	src := make([]byte, DefaultSegmentSize-BlockSize)
	dst := make([]byte, len(src))
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		copy(dst, src)
	}
}

// BenchmarkDecodeSegmentHeader decodes a full header (254 metablocks), as
// recovery does for every segment in the log.
func BenchmarkDecodeSegmentHeader(b *testing.B) {
	mbs := make([]Metablock, MaxMetablocks)
	for i := range mbs {
		mbs[i] = Metablock{Block: uint64(i * 3), Mask: 0xFF, Kind: KindData}
	}
	seg, _ := testSegment(7, mbs, MaxMetablocks)
	b.SetBytes(BlockSize)
	for b.Loop() {
		if _, err := DecodeSegmentHeader(seg[:BlockSize], MaxMetablocks); err != nil {
			b.Fatal(err)
		}
	}
}
