package main

import (
	"fmt"
	"math"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// logBars draws one group per label, one bar per series, of log10(value)
// (NaN or <= 0 is left out as a zero-height bar).
func logBars(title, ylabel, suffix string, labels, series []string, val func(g, s int) float64, path string) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	width := vg.Points(11)
	lo, hi := 0.0, 0.0
	for si, name := range series {
		var vals plotter.Values
		for gi := range labels {
			v := val(gi, si)
			if math.IsNaN(v) || v <= 0 {
				vals = append(vals, 0)
				continue
			}
			l := math.Log10(v)
			lo, hi = math.Min(lo, l), math.Max(hi, l)
			vals = append(vals, l)
		}
		bars, err := plotter.NewBarChart(vals, width)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(si)
		bars.Offset = vg.Length(float64(si)-float64(len(series)-1)/2) * width
		p.Add(bars)
		p.Legend.Add(name, bars)
	}
	p.NominalX(labels...)
	p.X.Tick.Label.Rotation = 0.25
	p.X.Tick.Label.XAlign = -1
	p.X.Tick.Label.YAlign = -0.5
	p.Y.Min, p.Y.Max = math.Floor(lo), math.Ceil(hi)+1
	p.Y.Tick.Marker = logTicks(int(p.Y.Min), int(p.Y.Max), suffix)
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	return p.Save(11*vg.Inch, 6*vg.Inch, path)
}

// drawVMCharts draws the VM section's charts into dir and returns their
// names relative to docs/benchmarks.
func drawVMCharts(r *VMResults, dir string) ([]string, error) {
	var out []string
	mains := vmMainSystems()
	var labels, names []string
	for _, j := range vmJobs {
		labels = append(labels, j.Title)
	}
	for _, s := range mains {
		names = append(names, s.Name)
	}
	// The throughput chart leaves out dm-writeboost, its base (1x).
	others, otherNames := mains[1:], names[1:]
	charts := []struct {
		name string
		draw func(path string) error
	}{
		{"vm-throughput.png", func(path string) error {
			return logBars("In the VM: throughput relative to dm-writeboost (log scale)", "× dm-writeboost", "x", labels, otherNames,
				func(g, s int) float64 { return r.ratio(vmJobs[g].ID, others[s].ID, "dmwb") }, path)
		}},
		{"vm-p99.png", func(path string) error {
			return logBars("In the VM: p99 latency, emulated ms (log scale)", "ms", "", labels, names,
				func(g, s int) float64 {
					x, ok := r.get(vmJobs[g].ID, mains[s].ID)
					if !ok {
						return math.NaN()
					}
					return vmP99(x, vmJobs[g].ID)
				}, path)
		}},
		{"vm-sustained-05.png", func(path string) error { return vmTimeline(r, "sus05", path) }},
		{"vm-sustained-2.png", func(path string) error { return vmTimeline(r, "sus2", path) }},
		{"vm-drain-recovery.png", func(path string) error { return vmDrainRecovery(r, path) }},
	}
	for _, c := range charts {
		if err := c.draw(filepath.Join(dir, c.name)); err != nil {
			return nil, fmt.Errorf("%s: %w", c.name, err)
		}
		out = append(out, "vm/"+c.name)
	}
	return out, nil
}

func vmTimeline(r *VMResults, job, path string) error {
	p := plot.New()
	p.Title.Text = "In the VM: " + vmJob(job).Title + ", IOPS per second"
	p.X.Label.Text = "seconds"
	p.Y.Label.Text = "IOPS (log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = ticks125{}
	lo, hi := math.Inf(1), 1.0
	for i, s := range vmMainSystems() {
		x, ok := r.get(job, s.ID)
		if !ok || len(x.PerSecond) == 0 {
			continue
		}
		pts := make(plotter.XYs, len(x.PerSecond))
		for k, v := range x.PerSecond {
			pts[k] = plotter.XY{X: float64(k + 1), Y: math.Max(v, 1)}
			lo, hi = math.Min(lo, pts[k].Y), math.Max(hi, pts[k].Y)
		}
		l, err := plotter.NewLine(pts)
		if err != nil {
			return err
		}
		l.Color = plotutil.Color(i)
		l.Width = vg.Points(2)
		p.Add(l)
		p.Legend.Add(s.Name, l)
	}
	if !math.IsInf(lo, 1) {
		// Room above the lines for the legend.
		p.Y.Min, p.Y.Max = lo/1.5, hi*6
	} else {
		// No system ran the job (a partial run): an empty chart, not
		// gonum's panic on a log axis from 0 to 0.
		p.Y.Min, p.Y.Max = 1, 10
	}
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	return p.Save(9*vg.Inch, 4.5*vg.Inch, path)
}

// ticks125 labels a log axis at 1, 2 and 5 times each power of ten.
type ticks125 struct{}

func (ticks125) Ticks(min, max float64) []plot.Tick {
	var t []plot.Tick
	for e := math.Floor(math.Log10(math.Max(min, 1e-9))); math.Pow(10, e) <= max; e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if v >= min && v <= max {
				t = append(t, plot.Tick{Value: v, Label: fmt.Sprintf("%g", v)})
			}
		}
	}
	return t
}

func vmDrainRecovery(r *VMResults, path string) error {
	p := plot.New()
	p.Title.Text = "In the VM: full drain and recovery after a power cut (emulated seconds)"
	p.Y.Label.Text = "seconds"
	var names []string
	var drain, rec plotter.Values
	for _, id := range powerCutSystems {
		names = append(names, vmSysName(id))
		d := r.Main.Drain[id]
		v := 0.0
		if d.Error == "" {
			v = d.Seconds
		}
		drain = append(drain, v)
		v = 0
		if r.Recover != nil {
			if x := r.Recover.Recovery[id]; x.Error == "" {
				v = x.Seconds
			}
		}
		rec = append(rec, v)
	}
	w := vg.Points(22)
	a, err := plotter.NewBarChart(drain, w)
	if err != nil {
		return err
	}
	a.Color, a.Offset = plotutil.Color(0), -w/2
	b, err := plotter.NewBarChart(rec, w)
	if err != nil {
		return err
	}
	b.Color, b.Offset = plotutil.Color(1), w/2
	p.Add(a, b, plotter.NewGrid())
	p.Legend.Add("full drain after the sustained 0.5x job", a)
	p.Legend.Add("recovery after the power cut", b)
	p.Legend.Top = true
	p.NominalX(names...)
	return p.Save(8*vg.Inch, 4.5*vg.Inch, path)
}
