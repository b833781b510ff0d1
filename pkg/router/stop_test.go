package router

import (
	"strings"
	"testing"
)

func TestStopper(t *testing.T) {
	for _, tc := range []struct {
		name    string
		stops   []string
		chunks  []string
		want    string
		stopped bool
	}{
		{"no stops", nil, []string{"the", " river"}, "the river", false},
		{"stop inside a chunk", []string{"river"}, []string{"the", " quiet river flows"}, "the quiet ", true},
		{"stop across chunks", []string{"quiet river"}, []string{"the quiet", " riv", "er flows"}, "the ", true},
		{"partial match then mismatch", []string{"quiet river"}, []string{"the quiet", " road"}, "the quiet road", false},
		{"earliest of several", []string{"flows", "quiet"}, []string{"the quiet river flows"}, "the ", true},
		{"stop at start", []string{"the"}, []string{"the river"}, "", true},
		{"held suffix flushed at end", []string{"river bank"}, []string{"the river"}, "the river", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStopper(tc.stops)
			var out strings.Builder
			stopped := false
			for _, c := range tc.chunks {
				emit, st := s.feed(c)
				out.WriteString(emit)
				if st {
					stopped = true
					break
				}
			}
			if !stopped {
				out.WriteString(s.flush())
			}
			if out.String() != tc.want || stopped != tc.stopped {
				t.Fatalf("got %q stopped %v, want %q %v", out.String(), stopped, tc.want, tc.stopped)
			}
			// Streaming in any chunking equals applying the stops at once.
			whole, wholeStopped := ApplyStop(strings.Join(tc.chunks, ""), tc.stops)
			if whole != tc.want || wholeStopped != tc.stopped {
				t.Fatalf("ApplyStop %q %v", whole, wholeStopped)
			}
		})
	}
}

// FuzzStopper: for any text, chunking and stop list, the streamed output is
// a prefix of the text, never contains a stop sequence, and equals the
// whole-text result.
func FuzzStopper(f *testing.F) {
	f.Add("the quiet river flows", "river", 3)
	f.Add("aaaa", "aa", 1)
	f.Fuzz(func(t *testing.T, text, stop string, step int) {
		if stop == "" || step <= 0 || step > 64 {
			return
		}
		stops := []string{stop}
		s := newStopper(stops)
		var out strings.Builder
		stopped := false
		for i := 0; i < len(text) && !stopped; i += step {
			emit, st := s.feed(text[i:min(i+step, len(text))])
			out.WriteString(emit)
			stopped = st
		}
		if !stopped {
			out.WriteString(s.flush())
		}
		got := out.String()
		if !strings.HasPrefix(text, got) || strings.Contains(got, stop) {
			t.Fatalf("text %q stop %q step %d: got %q", text, stop, step, got)
		}
		if want, _ := ApplyStop(text, stops); got != want {
			t.Fatalf("text %q stop %q step %d: streamed %q, whole %q", text, stop, step, got, want)
		}
	})
}
