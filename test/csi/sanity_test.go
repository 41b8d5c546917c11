package csi

import (
	"go/build"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

func csiSanity(t *testing.T) string {
	if p, err := exec.LookPath("csi-sanity"); err == nil {
		return p
	}
	p := filepath.Join(build.Default.GOPATH, "bin", "csi-sanity")
	if _, err := os.Stat(p); err != nil {
		testenv.Skipf(t, "csi-sanity not installed (hack/deps.sh installs it): %v", err)
	}
	return p
}

// TestSanity runs csi-sanity against the real plugin, for Mount and Block
// volumes, with StorageClass parameters and a config file.
func TestSanity(t *testing.T) { testSanity(t, newEnv) }

func testSanity(t *testing.T, newEnv func(*testing.T, ...string) *env) {
	requireEnv(t)
	bin := csiSanity(t)
	for _, access := range []string{"mount", "block"} {
		t.Run(access, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "config.yaml")
			os.WriteFile(cfg, []byte("defaultCacheFraction: 0.25\nminCacheSize: 8Mi\nmaxVolumes: 32\n"), 0o600)
			paramsFile := filepath.Join(dir, "params.yaml")
			os.WriteFile(paramsFile, []byte("writebackThreshold: \"60\"\nmaxBatchedWriteback: \"4\"\nreadCacheThreshold: \"16\"\ncsi.storage.k8s.io/fstype: ext4\n"), 0o600)
			e := newEnv(t, "--config", cfg)
			args := []string{
				"-csi.endpoint", "unix://" + e.socket,
				"-csi.stagingdir", filepath.Join(dir, "staging"),
				"-csi.mountdir", filepath.Join(dir, "mount"),
				"-csi.testvolumeparameters", paramsFile,
				"-csi.testvolumeaccesstype", access,
				"-csi.testvolumesize", "33554432", // 32 MiB
				"-csi.testvolumeexpandsize", "67108864",
				"-ginkgo.v", "-ginkgo.no-color",
			}
			cmd := exec.Command(bin, args...)
			out, err := cmd.CombinedOutput()
			res := regexp.MustCompile(`Ran \d+ of \d+ Specs.*\n.*`).Find(out)
			t.Logf("csi-sanity (%s): %s", access, res)
			// Skip reasons, once each (csi-sanity skips what the plugin
			// does not advertise).
			seen := map[string]int{}
			for _, m := range regexp.MustCompile(`\[SKIPPED\] ([A-Z][^\n]*)`).FindAllSubmatch(out, -1) {
				seen[string(m[1])]++
			}
			for reason, n := range seen {
				t.Logf("skipped %d: %s", n, reason)
			}
			os.WriteFile(filepath.Join(os.TempDir(), "csi-sanity-"+access+".log"), out, 0o644)
			if err != nil {
				os.WriteFile(filepath.Join(os.TempDir(), "csi-sanity-"+access+".log"), out, 0o644)
				t.Fatalf("csi-sanity failed: %v; output in %s", err, filepath.Join(os.TempDir(), "csi-sanity-"+access+".log"))
			}
		})
	}
}
