package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// tunableFlagNames overrides the flag spelling of a tunable where the
// issue's CLI uses a shorter name than dm-writeboost's.
var tunableFlagNames = map[string]string{"write_around_mode": "write-around"}

func tunableFlagName(name string) string {
	if n, ok := tunableFlagNames[name]; ok {
		return n
	}
	return strings.ReplaceAll(name, "_", "-")
}

// tunableFlags registers one flag per engine tunable, generated from
// engine.TunableSpecs so the CLI can never drift from the engine.
type tunableFlags struct {
	ints  map[string]*int
	bools map[string]*bool
	fs    *pflag.FlagSet
}

func addTunableFlags(fs *pflag.FlagSet) *tunableFlags {
	tf := &tunableFlags{ints: map[string]*int{}, bools: map[string]*bool{}, fs: fs}
	for _, s := range engine.TunableSpecs {
		flag := tunableFlagName(s.Name)
		static := ""
		if !s.Online {
			static = "; fixed while running"
		}
		if s.Unit == "bool" {
			help := fmt.Sprintf("%s (tunable %s%s)", strings.TrimPrefix(s.Help, "1: "), s.Name, static)
			tf.bools[s.Name] = fs.Bool(flag, s.Default != 0, help)
			if alias := strings.ReplaceAll(s.Name, "_", "-"); alias != flag {
				// The dm-writeboost spelling works too, without cluttering help.
				fs.BoolVar(tf.bools[s.Name], alias, s.Default != 0, help)
				_ = fs.MarkHidden(alias)
			}
			continue
		}
		help := fmt.Sprintf("%s (tunable %s, %d..%d %s%s)", s.Help, s.Name, s.Min, s.Max, s.Unit, static)
		tf.ints[s.Name] = fs.Int(flag, s.Default, help)
	}
	return tf
}

// tunables returns the values given, validated against their specs.
func (tf *tunableFlags) tunables() (engine.Tunables, error) {
	t := engine.DefaultTunables()
	for _, s := range engine.TunableSpecs {
		var v string
		if b, ok := tf.bools[s.Name]; ok {
			v = "0"
			if *b {
				v = "1"
			}
		} else {
			v = strconv.Itoa(*tf.ints[s.Name])
		}
		if err := t.Set(s.Name, v); err != nil {
			return t, fmt.Errorf("--%s: %w", tunableFlagName(s.Name), err)
		}
	}
	return t, nil
}
