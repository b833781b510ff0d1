package loadgen

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// IsTerminal reports whether f is a character device (a terminal), where
// a progress line is drawn; logs and pipes get none.
func IsTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// Progress draws one line, redrawn every interval, for a load level: a
// bar (when the level has a request count), requests done, the live
// completion rate and the p50 TTFT and ITL so far. Add is safe from any
// goroutine; Stop draws the last line and ends the line.
type Progress struct {
	w     io.Writer
	label string
	total int
	start time.Time

	mu   sync.Mutex
	done int
	errs int
	ttft []float64
	itl  []float64

	stop chan struct{}
	wg   sync.WaitGroup
}

// NewProgress starts drawing to w every interval.
func NewProgress(w io.Writer, label string, total int, interval time.Duration) *Progress {
	p := &Progress{w: w, label: label, total: total, start: time.Now(), stop: make(chan struct{})}
	p.wg.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.draw()
			}
		}
	})
	return p
}

// Add counts a finished request.
func (p *Progress) Add(r Record) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done++
	switch r.Outcome {
	case OutcomeOK:
		p.ttft = append(p.ttft, Millis(r.TTFT))
		for _, g := range r.Gaps {
			p.itl = append(p.itl, Millis(g))
		}
	case OutcomeAborted:
	default:
		p.errs++
	}
}

// Line is the progress line as drawn now.
func (p *Progress) Line() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%-10s ", p.label)
	if p.total > 0 {
		const width = 24
		n := min(width, p.done*width/p.total)
		fmt.Fprintf(&b, "[%s%s] %d/%d", strings.Repeat("=", n), strings.Repeat(" ", width-n), p.done, p.total)
	} else {
		fmt.Fprintf(&b, "%d done", p.done)
	}
	rate := float64(p.done) / max(time.Since(p.start).Seconds(), 1e-9)
	fmt.Fprintf(&b, "  %.1f req/s  ttft p50 %s  itl p50 %s  errors %d", rate, p50(p.ttft), p50(p.itl), p.errs)
	return b.String()
}

func p50(xs []float64) string {
	if len(xs) == 0 {
		return "-"
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return fmt.Sprintf("%.1fms", quantile(s, 0.5))
}

func (p *Progress) draw() { fmt.Fprintf(p.w, "\r\033[K%s", p.Line()) }

// Stop stops redrawing, draws the final line and ends it.
func (p *Progress) Stop() {
	close(p.stop)
	p.wg.Wait()
	p.draw()
	fmt.Fprintln(p.w)
}

// LevelLine is a finished level in one line: what a log gets where a
// terminal gets the progress line.
func LevelLine(name string, s Summary) string {
	return fmt.Sprintf("%s done in %.1fs: %d ok, %d aborted, %d errors; %.2f req/s, %.1f output tokens/s, ttft p50 %.1fms, itl p50 %.2fms",
		name, s.DurationS, s.Completed, s.Aborted, s.Errors, s.RequestsPerS, s.OutputTokensPerS, s.TTFT.P50, s.ITL.P50)
}
