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

// logTicks labels a log10 axis with the ratios it stands for.
func logTicks(lo, hi int, suffix string) plot.ConstantTicks {
	var t plot.ConstantTicks
	for e := lo; e <= hi; e++ {
		v := math.Pow(10, float64(e))
		label := fmt.Sprintf("%g%s", v, suffix)
		t = append(t, plot.Tick{Value: float64(e), Label: label})
	}
	return t
}

// groupedLogBars draws one group per workload, one bar per system, of
// log10(value(system)/base(workload)) with value from get (NaN or <= 0 is
// left out as a zero-height bar).
func groupedLogBars(res *Results, title, ylabel, suffix string, get func(w Workload, s System) float64, path string) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	width := vg.Points(9)
	lo, hi := 0.0, 0.0
	n := len(systems)
	for i, s := range systems {
		var vals plotter.Values
		for _, w := range workloads {
			v := get(w, s)
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
		bars.LineStyle.Width = vg.Length(0)
		bars.Color = plotutil.Color(i)
		bars.Offset = vg.Length(float64(i)-float64(n-1)/2) * width
		p.Add(bars)
		p.Legend.Add("("+s.ID+") "+s.Name, bars)
	}
	var names []string
	for _, w := range workloads {
		names = append(names, w.Title)
	}
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.25
	p.X.Tick.Label.XAlign = -1
	p.X.Tick.Label.YAlign = -0.5
	p.Y.Min, p.Y.Max = math.Floor(lo), math.Ceil(hi)+1.5
	p.Y.Tick.Marker = logTicks(int(p.Y.Min), int(p.Y.Max), suffix)
	p.Legend.Top = true
	p.Legend.Left = false
	p.Add(plotter.NewGrid())
	return p.Save(11*vg.Inch, 6*vg.Inch, path)
}

// drawCharts renders every chart it has data for and returns their file
// names (relative to dir).
func drawCharts(res *Results, dir string) ([]string, error) {
	var out []string
	if len(res.Fio) > 0 {
		name := "fio-throughput.png"
		err := groupedLogBars(res, "Throughput relative to (a) nbdkit memory (log scale)", "× (a)", "x",
			func(w Workload, s System) float64 { return ratio(res, w.ID, s.ID, "a") }, filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, name)
		name = "fio-p99.png"
		err = groupedLogBars(res, "p99 completion latency (log scale, ms)", "ms", "",
			func(w Workload, s System) float64 {
				r, ok := res.Fio[w.ID][s.ID]
				if !ok || r.Error != "" {
					return math.NaN()
				}
				return r.P99Ms()
			}, filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, name)
	}
	if len(res.Writeback) > 0 {
		name := "writeback.png"
		if err := writebackChart(res, filepath.Join(dir, name)); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, name)
	}
	if len(res.Open) > 0 {
		name := "open.png"
		if err := openChart(res, filepath.Join(dir, name)); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, name)
	}
	if len(res.RingFull.PerSecondIOPS) > 0 {
		name := "ringfull-iops.png"
		if err := ringSeriesChart(res, filepath.Join(dir, name)); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, name)
		name = "ringfull-latency.png"
		if err := ringHistChart(res, filepath.Join(dir, name)); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, name)
	}
	return out, nil
}

func writebackChart(res *Results, path string) error {
	p := plot.New()
	p.Title.Text = "Writeback time on the HDD model: sorted batches vs arrival order"
	p.Y.Label.Text = "seconds (virtual clock)"
	var sorted, arrival plotter.Values
	var names []string
	for _, r := range res.Writeback {
		sorted = append(sorted, r.SortedSec)
		arrival = append(arrival, r.ArrivalSec)
		names = append(names, fmt.Sprintf("%d blocks / %s (%.1fx)", r.Blocks, humanBytes(float64(r.BackingBytes)), r.Speedup))
	}
	w := vg.Points(22)
	a, err := plotter.NewBarChart(arrival, w)
	if err != nil {
		return err
	}
	a.Color, a.Offset = plotutil.Color(1), -w/2
	s, err := plotter.NewBarChart(sorted, w)
	if err != nil {
		return err
	}
	s.Color, s.Offset = plotutil.Color(0), w/2
	p.Add(a, s, plotter.NewGrid())
	p.Legend.Add("arrival order", a)
	p.Legend.Add("writeboost sorted batches", s)
	p.Legend.Top = true
	p.Legend.Left = true
	p.NominalX(names...)
	return p.Save(10*vg.Inch, 5*vg.Inch, path)
}

func openChart(res *Results, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Opening a %s cache filled to %.0f%%: bytes read", humanBytes(float64(res.Config.OpenCacheBytes)), 100*res.Config.OpenFillFraction)
	p.Y.Label.Text = "% of the cache device read"
	var vals plotter.Values
	var names []string
	for _, r := range res.Open {
		vals = append(vals, r.ReadPctOfCache)
		names = append(names, fmt.Sprintf("%s (%.2f s)", r.Case, r.OpenSec))
	}
	b, err := plotter.NewBarChart(vals, vg.Points(40))
	if err != nil {
		return err
	}
	b.Color = plotutil.Color(0)
	goal := plotter.NewFunction(func(float64) float64 { return 5 })
	goal.Color = plotutil.Color(1)
	goal.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(b, goal, plotter.NewGrid())
	p.Legend.Add("goal after a clean stop: < 5%", goal)
	p.NominalX(names...)
	p.Y.Min = 0
	p.Y.Max = math.Max(6, maxOf(vals)*1.15)
	return p.Save(6*vg.Inch, 4.5*vg.Inch, path)
}

func maxOf(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		m = math.Max(m, x)
	}
	return m
}

func ringSeriesChart(res *Results, path string) error {
	rf := res.RingFull
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Random 4K writes with the log ring full (%s cache, %d writers)", humanBytes(float64(rf.CacheBytes)), rf.Writers)
	p.X.Label.Text = "seconds after the ring filled"
	p.Y.Label.Text = "writes per second"
	pts := make(plotter.XYs, len(rf.PerSecondIOPS))
	for i, v := range rf.PerSecondIOPS {
		pts[i] = plotter.XY{X: float64(i + 1), Y: v}
	}
	l, err := plotter.NewLine(pts)
	if err != nil {
		return err
	}
	l.Color = plotutil.Color(0)
	l.Width = vg.Points(2)
	raw := plotter.NewFunction(func(float64) float64 { return rf.RawHDDIOPS })
	raw.Color = plotutil.Color(1)
	raw.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(l, raw, plotter.NewGrid())
	p.Legend.Add("writeboost (per second)", l)
	p.Legend.Add(fmt.Sprintf("raw simulated HDD, %d writers (%.0f/s)", rf.Writers, rf.RawHDDIOPS), raw)
	p.Legend.Top = true
	p.Y.Min = 0
	p.Y.Max = math.Max(maxOf(rf.PerSecondIOPS), rf.RawHDDIOPS) * 1.3
	p.X.Min, p.X.Max = 0, float64(len(pts)+1)
	return p.Save(9*vg.Inch, 4.5*vg.Inch, path)
}

func ringHistChart(res *Results, path string) error {
	rf := res.RingFull
	p := plot.New()
	p.Title.Text = "Write latency with the ring full vs the raw HDD model (log scale)"
	p.X.Label.Text = "latency, ms"
	p.Y.Label.Text = "density (each area is 1)"
	logv := func(ms []float64) plotter.Values {
		v := make(plotter.Values, 0, len(ms))
		for _, x := range ms {
			v = append(v, math.Log10(math.Max(x, 1e-3)))
		}
		return v
	}
	lo, hi := 0.0, 0.0
	var hs []*plotter.Histogram
	for i, set := range [][]float64{rf.LatencyMs, rf.RawLatencyMs} {
		if len(set) == 0 {
			continue
		}
		v := logv(set)
		h, err := plotter.NewHist(v, 60)
		if err != nil {
			return err
		}
		h.Normalize(1)
		h.FillColor = plotutil.Color(i)
		h.LineStyle.Width = 0
		hs = append(hs, h)
		for _, x := range v {
			lo, hi = math.Min(lo, x), math.Max(hi, x)
		}
		p.Add(h)
		if i == 0 {
			p.Legend.Add(fmt.Sprintf("writeboost, ring full (p99 %.1f ms)", rf.P99Ms), h)
		} else {
			p.Legend.Add(fmt.Sprintf("raw HDD model (p99 %.1f ms)", rf.RawHDDP99Ms), h)
		}
	}
	if len(hs) == 0 {
		return nil
	}
	p.X.Min, p.X.Max = math.Floor(lo), math.Ceil(hi)
	p.X.Tick.Marker = logTicks(int(p.X.Min), int(p.X.Max), "")
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	return p.Save(9*vg.Inch, 4.5*vg.Inch, path)
}
