package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/term"
)

// progressBar shows how far a long operation (drain, check) has come: a
// bar redrawn in place on a terminal, plain lines at most once per
// plainInterval otherwise, so logs of a script stay readable.
type progressBar struct {
	w     io.Writer
	tty   bool
	unit  string
	last  time.Time
	drawn bool
	quiet bool // no plain lines when not on a terminal
}

const plainInterval = 2 * time.Second

func newProgressBar(w io.Writer, unit string) *progressBar {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &progressBar{w: w, tty: tty, unit: unit}
}

// update reports done of total units. A total of 0 means unknown.
func (b *progressBar) update(done, total uint64) {
	now := time.Now()
	if b.tty {
		if now.Sub(b.last) < 100*time.Millisecond && done < total {
			return
		}
		b.last = now
		b.drawn = true
		fmt.Fprintf(b.w, "\r%s", renderBar(done, total, b.unit, 30))
		return
	}
	if b.quiet || !b.last.IsZero() && now.Sub(b.last) < plainInterval {
		return
	}
	b.last = now
	fmt.Fprintln(b.w, strings.TrimSpace(renderCounts(done, total, b.unit)))
}

// finish ends the bar's line on a terminal.
func (b *progressBar) finish() {
	if b.tty && b.drawn {
		fmt.Fprintln(b.w)
	}
}

func renderBar(done, total uint64, unit string, width int) string {
	if total == 0 {
		return renderCounts(done, total, unit)
	}
	if done > total {
		done = total
	}
	fill := int(uint64(width) * done / total)
	return "[" + strings.Repeat("#", fill) + strings.Repeat(".", width-fill) + "] " + renderCounts(done, total, unit)
}

func renderCounts(done, total uint64, unit string) string {
	if total == 0 {
		return fmt.Sprintf("%d %s", done, unit)
	}
	if done > total {
		done = total
	}
	return fmt.Sprintf("%5.1f%%  %d/%d %s", 100*float64(done)/float64(total), done, total, unit)
}
