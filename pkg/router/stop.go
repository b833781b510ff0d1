package router

import "strings"

// stopper applies OpenAI `stop` sequences to streamed text: it emits text
// as soon as it can no longer be the start of a stop sequence, holds back
// the rest, and on a match cuts the output just before it — the stop
// sequence itself never reaches the client.
type stopper struct {
	stops   []string
	pending string // held back: a suffix that may begin a stop sequence
	stopped bool
}

func newStopper(stops []string) *stopper { return &stopper{stops: stops} }

// feed takes the next text and returns what may be sent now, and whether a
// stop sequence was found (then nothing more is to be sent).
func (s *stopper) feed(text string) (string, bool) {
	if s.stopped {
		return "", true
	}
	if len(s.stops) == 0 {
		return text, false
	}
	buf := s.pending + text
	cut := -1
	for _, st := range s.stops {
		if i := strings.Index(buf, st); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut >= 0 {
		s.stopped, s.pending = true, ""
		return buf[:cut], true
	}
	// Hold back the longest suffix of buf that is a proper prefix of a stop.
	hold := 0
	for _, st := range s.stops {
		for n := min(len(st)-1, len(buf)); n > hold; n-- {
			if strings.HasSuffix(buf, st[:n]) {
				hold = n
				break
			}
		}
	}
	s.pending = buf[len(buf)-hold:]
	return buf[:len(buf)-hold], false
}

// flush returns what is still held back once the generation ended without
// a stop sequence.
func (s *stopper) flush() string {
	out := s.pending
	s.pending = ""
	return out
}

// ApplyStop cuts text before the first stop sequence, as the router does to
// a stream; tests use it with executor.Reference.
func ApplyStop(text string, stops []string) (string, bool) {
	s := newStopper(stops)
	out, stopped := s.feed(text)
	if !stopped {
		out += s.flush()
	}
	return out, stopped
}
