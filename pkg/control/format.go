package control

import (
	"fmt"
	"io"
	"reflect"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// WriteStatus prints st for a human: one "key value" line per field under
// the same snake_case names as the JSON (so what a user reads is what a
// script greps), nested groups indented, sizes also in binary units.
func WriteStatus(w io.Writer, st engine.Status) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	writeFields(tw, reflect.ValueOf(st), "")
	return tw.Flush()
}

func writeFields(w io.Writer, v reflect.Value, indent string) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "" || name == "-" {
			continue
		}
		fv := v.Field(i)
		if strings.Contains(opts, "omitempty") && fv.IsZero() {
			continue
		}
		if fv.Kind() == reflect.Struct {
			fmt.Fprintf(w, "%s%s:\t\n", indent, name)
			writeFields(w, fv, indent+"  ")
			continue
		}
		if fv.Kind() == reflect.Slice && fv.Type().Elem().Kind() == reflect.Struct {
			// A list of records (health causes): one line each, its
			// first field as the key, the rest as the value.
			fmt.Fprintf(w, "%s%s:\t\n", indent, name)
			for j := 0; j < fv.Len(); j++ {
				el := fv.Index(j)
				var rest []string
				for k := 1; k < el.NumField(); k++ {
					rest = append(rest, fmt.Sprint(el.Field(k).Interface()))
				}
				fmt.Fprintf(w, "%s  %v\t%s\n", indent, el.Field(0).Interface(), strings.Join(rest, " "))
			}
			continue
		}
		fmt.Fprintf(w, "%s%s\t%s\n", indent, name, formatValue(name, fv))
	}
}

func formatValue(name string, v reflect.Value) string {
	switch v.Kind() {
	case reflect.Float32, reflect.Float64:
		f := v.Float()
		switch {
		case strings.HasSuffix(name, "_ratio"), strings.HasSuffix(name, "_utilization"):
			return fmt.Sprintf("%.4f (%.1f%%)", f, 100*f)
		case strings.HasSuffix(name, "_bytes_per_sec"):
			return fmt.Sprintf("%.0f (%s/s)", f, HumanBytes(int64(f)))
		}
		return strconv.FormatFloat(f, 'g', 6, 64)
	case reflect.Bool:
		if v.Bool() {
			return "1"
		}
		return "0"
	case reflect.Int, reflect.Int64, reflect.Int32:
		n := v.Int()
		if isByteField(name) {
			return fmt.Sprintf("%d (%s)", n, HumanBytes(n))
		}
		return strconv.FormatInt(n, 10)
	case reflect.Uint, reflect.Uint64, reflect.Uint32:
		n := v.Uint()
		if isByteField(name) {
			return fmt.Sprintf("%d (%s)", n, HumanBytes(int64(n)))
		}
		return strconv.FormatUint(n, 10)
	}
	return fmt.Sprint(v.Interface())
}

func isByteField(name string) bool {
	return strings.HasSuffix(name, "_size") || strings.HasSuffix(name, "_bytes")
}

// HumanBytes formats n in binary units (KiB, MiB, ...).
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	f := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		f /= unit
		if f < unit && f > -unit {
			return fmt.Sprintf("%.1f %s", f, u)
		}
	}
	return fmt.Sprintf("%.1f EiB", f/unit)
}
