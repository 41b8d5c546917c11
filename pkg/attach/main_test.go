package attach

import (
	"fmt"
	"os"
	"testing"
)

// TestMain lets the test binary double as the relay program: nbdfuse runs
// "<test binary> nbd-relay --socket ..." in command mode, as it runs
// "writeboost nbd-relay ..." in production, through the same command.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == RelayCommandName {
		cmd := NewRelayCommand()
		cmd.SetArgs(os.Args[2:])
		cmd.SilenceUsage = true
		if err := cmd.Execute(); err != nil {
			fmt.Fprintln(os.Stderr, "nbd-relay:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func testRelayCommand(t *testing.T) []string {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return []string{exe, RelayCommandName}
}
