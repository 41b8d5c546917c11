// Package testenv lets tests that need external tools, root or kernel
// features skip with a clear message on a developer's machine, and fail
// instead in CI, where hack/deps.sh installs everything
// (WRITEBOOST_REQUIRE_TOOLS=1), so a CI run can never pass by skipping.
// It also holds the few helpers several test packages share.
package testenv

import (
	"bytes"
	"os"
	"os/exec"
	"sync"
	"testing"
)

// Strict reports whether missing prerequisites must fail tests.
func Strict() bool { return os.Getenv("WRITEBOOST_REQUIRE_TOOLS") == "1" }

// Skipf skips the test, or fails it in strict mode.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	if Strict() {
		t.Fatalf("prerequisite missing (WRITEBOOST_REQUIRE_TOOLS=1): "+format, args...)
	}
	t.Skipf("skipping: "+format+" (install with hack/deps.sh)", args...)
}

// RequireTools skips (or fails, in strict mode) unless every tool is on PATH.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			Skipf(t, "%s not found on PATH", tool)
		}
	}
}

// RequireRoot skips (or fails, in strict mode) unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skipf(t, "test needs root")
	}
}

// KernelTier reports whether the tests run in the real-kernel VM of
// make vm-test (hack/vm), where every kernel feature must be there.
func KernelTier() bool { return os.Getenv("WRITEBOOST_KERNEL_TIER") == "1" }

// RequireKernelFeature skips unless path exists. On the host (no nbd, no
// device-mapper) it skips even in strict mode, since no package installs a
// kernel module; in the VM tier (KernelTier) a missing feature fails.
func RequireKernelFeature(t testing.TB, path, what string) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		if KernelTier() {
			t.Fatalf("%s not available (%s absent) in the real-kernel tier", what, path)
		}
		t.Skipf("skipping: %s not available (%s absent); this kernel lacks it (make vm-test runs it)", what, path)
	}
}

// SyncBuffer is a bytes.Buffer that several goroutines may write (a
// process's output, klog's writers) while a test reads it.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is what was written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
