package driver

import (
	goflag "flag"
	"io"
	"os"
	"testing"

	"k8s.io/klog/v2"
)

// TestMain keeps the sweep's thousands of log lines out of the output
// unless WRITEBOOST_TEST_LOG is set.
func TestMain(m *testing.M) {
	if os.Getenv("WRITEBOOST_TEST_LOG") == "" {
		fs := goflag.NewFlagSet("klog", goflag.ContinueOnError)
		klog.InitFlags(fs)
		_ = fs.Set("logtostderr", "false")
		_ = fs.Set("alsologtostderr", "false")
		_ = fs.Set("stderrthreshold", "FATAL")
		klog.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}
