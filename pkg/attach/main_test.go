package attach

import (
	"context"
	"flag"
	"fmt"
	"os"
	"testing"
	"time"
)

// TestMain lets the test binary double as the relay program: nbdfuse runs
// "<test binary> nbd-relay --socket ..." in command mode, as it runs
// "writeboost nbd-relay ..." in production.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "nbd-relay" {
		os.Exit(relayMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

func relayMain(args []string) int {
	fs := flag.NewFlagSet("nbd-relay", flag.ContinueOnError)
	socket := fs.String("socket", "", "")
	export := fs.String("export", "", "")
	dead := fs.Duration("dead-conn-timeout", time.Minute, "")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := ServeRelay(context.Background(), RelayStdio(), *socket, *export, *dead); err != nil {
		fmt.Fprintln(os.Stderr, "nbd-relay:", err)
		return 1
	}
	return 0
}

func testRelayCommand(t *testing.T) []string {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return []string{exe, "nbd-relay"}
}
