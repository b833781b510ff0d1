package loadgen

import (
	"fmt"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// loadOf is a level's x value and the axis name.
func loadOf(s Summary) (float64, string) {
	if s.Rate > 0 {
		return s.Rate, "request rate (req/s)"
	}
	return float64(s.Concurrency), "concurrency"
}

// series is one named line.
type series struct {
	name string
	xy   plotter.XYs
}

// save draws lines on one chart and writes it as a PNG.
func save(path, title, xLabel, yLabel string, lines []series) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xLabel
	p.Y.Label.Text = yLabel
	p.Add(plotter.NewGrid())
	p.Legend.Top, p.Legend.Left = true, true // curves rise to the right
	for i, s := range lines {
		if len(s.xy) == 0 {
			continue
		}
		l, pts, err := plotter.NewLinePoints(s.xy)
		if err != nil {
			return err
		}
		l.Color, pts.Color = plotutil.Color(i), plotutil.Color(i)
		l.Dashes = plotutil.Dashes(i / len(plotutil.SoftColors))
		pts.Shape = plotutil.Shape(i)
		pts.Radius = vg.Points(2)
		p.Add(l)
		if len(s.xy) <= 16 {
			p.Add(pts)
		}
		p.Legend.Add(s.name, l)
	}
	return p.Save(18*vg.Centimeter, 11*vg.Centimeter, path)
}

// cdfSeries is the curve of 101 quantiles: x the value, y the share.
func cdfSeries(name string, q []float64) series {
	xy := make(plotter.XYs, len(q))
	for i, v := range q {
		xy[i] = plotter.XY{X: v, Y: float64(i) / 100}
	}
	return series{name, xy}
}

// WritePlots writes the PNG charts of one run into dir and returns their
// paths: latency CDFs (TTFT, ITL, end to end) with one curve a level,
// TTFT and ITL percentiles against load, and throughput against load.
func WritePlots(dir string, r Results) ([]string, error) {
	var paths []string
	cdfs := []struct {
		file, title string
		pick        func(CDF) []float64
	}{
		{"ttft_cdf.png", "time to first token", func(c CDF) []float64 { return c.TTFT }},
		{"itl_cdf.png", "inter-token latency", func(c CDF) []float64 { return c.ITL }},
		{"latency_cdf.png", "end-to-end latency", func(c CDF) []float64 { return c.Latency }},
	}
	for _, c := range cdfs {
		var lines []series
		for _, s := range r.Runs {
			lines = append(lines, cdfSeries(s.Load().Name(), c.pick(s.CDF)))
		}
		path := filepath.Join(dir, c.file)
		if err := save(path, r.Label+": "+c.title+" (CDF)", "ms", "share of requests", lines); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	vsLoad := []struct {
		file, title, y string
		lines          func([]Summary) []series
	}{
		{"ttft_vs_load.png", "time to first token", "ms", func(ss []Summary) []series {
			return percentileLines(ss, "", func(s Summary) Percentiles { return s.TTFT })
		}},
		{"itl_vs_load.png", "inter-token latency", "ms", func(ss []Summary) []series {
			return percentileLines(ss, "", func(s Summary) Percentiles { return s.ITL })
		}},
		{"throughput_vs_load.png", "output throughput", "tokens/s", func(ss []Summary) []series {
			return []series{metricLine("output tokens/s", ss, func(s Summary) float64 { return s.OutputTokensPerS })}
		}},
	}
	for _, v := range vsLoad {
		if len(r.Runs) == 0 {
			break
		}
		_, xLabel := loadOf(r.Runs[0])
		path := filepath.Join(dir, v.file)
		if err := save(path, r.Label+": "+v.title, xLabel, v.y, v.lines(r.Runs)); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	return paths, nil
}

func metricLine(name string, ss []Summary, f func(Summary) float64) series {
	xy := make(plotter.XYs, len(ss))
	for i, s := range ss {
		x, _ := loadOf(s)
		xy[i] = plotter.XY{X: x, Y: f(s)}
	}
	return series{name, xy}
}

func percentileLines(ss []Summary, prefix string, f func(Summary) Percentiles) []series {
	return []series{
		metricLine(prefix+"p50", ss, func(s Summary) float64 { return f(s).P50 }),
		metricLine(prefix+"p90", ss, func(s Summary) float64 { return f(s).P90 }),
		metricLine(prefix+"p99", ss, func(s Summary) float64 { return f(s).P99 }),
	}
}

// WriteCompare draws two runs side by side (e.g. kvferry against another
// server, or before and after a change) into dir: throughput, TTFT and
// ITL against load, one line a run (p50 and p99 for latencies).
func WriteCompare(dir string, a, b Results) ([]string, error) {
	if len(a.Runs) == 0 || len(b.Runs) == 0 {
		return nil, fmt.Errorf("compare: a run has no levels")
	}
	_, xLabel := loadOf(a.Runs[0])
	if _, xb := loadOf(b.Runs[0]); xb != xLabel {
		return nil, fmt.Errorf("compare: one run is by %s, the other by %s", xLabel, xb)
	}
	charts := []struct {
		file, title, y string
		lines          func(r Results) []series
	}{
		{"compare_throughput.png", "output throughput", "tokens/s", func(r Results) []series {
			return []series{metricLine(r.Label, r.Runs, func(s Summary) float64 { return s.OutputTokensPerS })}
		}},
		{"compare_ttft.png", "time to first token", "ms", func(r Results) []series {
			ps := percentileLines(r.Runs, r.Label+" ", func(s Summary) Percentiles { return s.TTFT })
			return []series{ps[0], ps[2]}
		}},
		{"compare_itl.png", "inter-token latency", "ms", func(r Results) []series {
			ps := percentileLines(r.Runs, r.Label+" ", func(s Summary) Percentiles { return s.ITL })
			return []series{ps[0], ps[2]}
		}},
	}
	var paths []string
	for _, c := range charts {
		path := filepath.Join(dir, c.file)
		if err := save(path, a.Label+" vs "+b.Label+": "+c.title, xLabel, c.y, append(c.lines(a), c.lines(b)...)); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	return paths, nil
}
