package kvtransfer

import (
	"fmt"
	"sync"
	"time"
)

// Link is the receiver's end of one remote writer that copies into the
// registered memory itself (shm: its unix socket; ucx: its endpoint).
// Frames to the writer are queued and sent by the link's owner (the
// transport), so that a stopped writer can never block the receiver.
type Link struct {
	mu     sync.Mutex
	queue  []Header
	notify func() // tells the owner the queue has frames; never blocks
	bound  map[uint64]*RecvSession
}

// NewLink returns a link whose owner is told, by notify, when frames wait
// in its queue; notify must not block.
func NewLink(notify func()) *Link {
	return &Link{notify: notify, bound: map[uint64]*RecvSession{}}
}

// Send queues h for the writer; it never blocks.
func (l *Link) Send(h Header) {
	l.mu.Lock()
	l.queue = append(l.queue, h)
	l.mu.Unlock()
	l.notify()
}

// Take returns the queued frames, emptying the queue: the owner sends them.
func (l *Link) Take() []Header {
	l.mu.Lock()
	defer l.mu.Unlock()
	q := l.queue
	l.queue = nil
	return q
}

// LinkFrame handles one frame from a link's writer (BIND, LANDED, DONE,
// ABORT_ACK); run quiesced, when not nil, outside any lock. A frame no
// writer may send answers false: the link is then broken.
func (r *Receiver) LinkFrame(l *Link, h Header) (quiesced func(), ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch h.Kind {
	case FrameBind:
		l.Send(Header{Kind: r.bindLocked(l, h), Session: h.Session})
	case FrameLanded:
		return r.landedLocked(l, h), true
	case FrameDone, FrameAbortAck:
		return r.writerDoneLocked(l, h), true
	default:
		return nil, false
	}
	return nil, true
}

// LinkGone proves every session still granted to a closed link (its
// writer can write no more): run the returned callbacks outside any lock.
func (r *Receiver) LinkGone(l *Link) []func() {
	r.mu.Lock()
	defer r.mu.Unlock()
	var qs []func()
	for _, s := range l.bound {
		r.endLocked(s, ErrConnLost)
		if q := r.quietLocked(l, s); q != nil {
			qs = append(qs, q)
		}
	}
	return qs
}

// bindLocked grants session h.Session to the link's writer when it is
// registered, unfinished, ungranted and of h.Index blocks.
func (r *Receiver) bindLocked(l *Link, h Header) FrameKind {
	s, ok := r.sessions[h.Session]
	if !ok || s.ended || s.link != nil || int(h.Index) != len(s.dests) {
		return FrameBindRefused
	}
	s.link = l
	l.bound[s.id] = s
	return FrameBindOK
}

// landedLocked records a block the writer copied. A frame that names a
// block outside the session ends it (the writer is still bound: its word or
// its close proves it quiet).
func (r *Receiver) landedLocked(l *Link, h Header) func() {
	s, ok := l.bound[h.Session]
	if !ok || s.ended {
		return nil
	}
	switch {
	case int(h.Index) >= len(s.dests) || int(h.Length) != len(s.dests[h.Index]):
		r.endLocked(s, fmt.Errorf("%w: block %d length %d", ErrBadDescriptor, h.Index, h.Length))
		return nil
	case s.received[h.Index]:
		r.endLocked(s, fmt.Errorf("%w: block %d sent twice", ErrBadDescriptor, h.Index))
		return nil
	}
	s.received[h.Index] = true
	s.nReceived++
	s.bytes += int64(h.Length)
	s.lastProgress = time.Now()
	if s.onBlock == nil {
		return nil
	}
	onBlock, at := s.onBlock, s.lastProgress
	return func() { onBlock(at) }
}

// writerDoneLocked handles the writer's word that it writes no more for a
// session: DONE (which also completes it when every block landed) or
// ABORT_ACK.
func (r *Receiver) writerDoneLocked(l *Link, h Header) func() {
	s, ok := l.bound[h.Session]
	if !ok {
		return nil
	}
	if h.Kind == FrameDone {
		if s.nReceived != len(s.dests) || int(h.Index) != len(s.dests) {
			r.endLocked(s, fmt.Errorf("%w: %d of %d blocks, sender says %d", ErrIncomplete, s.nReceived, len(s.dests), h.Index))
		}
		r.endLocked(s, nil)
	}
	return r.quietLocked(l, s)
}

// quietLocked marks s as no longer written by its writer and returns its
// quiescence callback when Finish is waiting for it.
func (r *Receiver) quietLocked(l *Link, s *RecvSession) func() {
	delete(l.bound, s.id)
	delete(r.awaiting, s)
	s.writerDone = true
	q := s.onQuiesced
	s.onQuiesced = nil
	return q
}
