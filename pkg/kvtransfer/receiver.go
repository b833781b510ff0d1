package kvtransfer

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Errors a receive session can end with.
var (
	ErrIncomplete    = errors.New("kvtransfer: done before every block arrived")
	ErrBadDescriptor = errors.New("kvtransfer: frame outside the session's allocation")
	ErrConnLost      = errors.New("kvtransfer: data connection lost mid-block")
	ErrAborted       = errors.New("kvtransfer: session aborted")
)

// ErrForeignFrame: a tcp frame names a live session but has the wrong key,
// or comes on another connection than the one the session is bound to.
// The frame is dropped and its connection closed; the session is not
// touched (a guesser must not be able to fail someone else's transfer).
var ErrForeignFrame = errors.New("kvtransfer: frame for a session this connection does not own")

// Receiver is the target side of a transfer (NIXL: the agent whose memory
// is registered and written): the sessions registered on it and their
// proofs, whatever the transport. A transport package (tcp, shm, ucx)
// makes one with NewReceiver and lands what its peers send through one of
// two doors:
//
//   - LandData / LandDone (tcp): the receiver's own reader copies each DATA
//     frame into its block. It is the only writer of the blocks, which
//     gives a local proof of quiescence: once a session is finished and no
//     frame for it is being read, no byte can touch its memory again.
//   - LinkFrame / LinkGone (shm, ucx): the writer is the peer process,
//     which copies into the registered memory itself once the receiver
//     granted it the session (BIND); the proof is then the writer's word
//     (DONE, ABORT_ACK) or its end (its link's close).
type Receiver struct {
	endpoint string // what writers dial
	maxBlock uint32
	lg       *zap.Logger
	stop     func() error // the transport's: stops accepting, ends its goroutines

	mu       sync.Mutex
	sessions map[uint64]*RecvSession
	awaiting map[*RecvSession]struct{} // finished, waiting for the writer's word
	// finished remembers the last finishedMemory sessions' ids and keys
	// (a ring): a writer's frames of a session finished before they were
	// read still vouch for its connection, which stays usable for its next
	// session instead of being cut after the writer pooled it.
	finished    map[SessionID]struct{}
	finishedLog []SessionID
	closed      bool
}

// finishedMemory bounds Receiver.finished: far more sessions than finish
// between a writer's last write and the receiver reading it.
const finishedMemory = 4096

// NewReceiver returns a receiver for a transport listening at endpoint;
// maxBlock bounds a frame's payload; stop, called once by Close, stops the
// transport and waits for its goroutines.
func NewReceiver(endpoint string, maxBlock int, lg *zap.Logger, stop func() error) *Receiver {
	return &Receiver{endpoint: endpoint, maxBlock: uint32(maxBlock), lg: lg, stop: stop,
		sessions: map[uint64]*RecvSession{}, awaiting: map[*RecvSession]struct{}{}, finished: map[SessionID]struct{}{}}
}

// MaxBlock bounds a frame's payload, for the transport's header decoding.
func (r *Receiver) MaxBlock() uint32 { return r.maxBlock }

// Logger is the receiver's logger, for its transport.
func (r *Receiver) Logger() *zap.Logger { return r.lg }

// RecvSession is one transfer's destination on the receiver.
type RecvSession struct {
	id    uint64
	key   uint64 // tcp: every frame of the session must carry it
	dests [][]byte
	done  chan struct{} // closed when the session ends (complete or failed)

	// guarded by Receiver.mu
	received     []bool
	nReceived    int
	bytes        int64
	lastProgress time.Time
	err          error
	ended        bool
	aborted      bool
	writing      int
	readers      map[io.Closer]int // connections reading a block of this session now
	owner        io.Closer         // tcp: the connection the session is bound to (the first that wrote it)
	link         *Link             // shm, ucx: the writer granted this session; nil for tcp
	writerDone   bool              // the writer said, or proved by closing, it writes no more
	onQuiesced   func()
	onBlock      func(time.Time)
}

// Done is closed when the session completed (every block and the DONE
// notification arrived) or failed; Err tells which.
func (s *RecvSession) Done() <-chan struct{} { return s.done }

// ID returns the session id that tags the session's frames.
func (s *RecvSession) ID() uint64 { return s.id }

// Reask sends ABORT again to the writer of every finished session that
// still waits for the writer's word, so that a writer that was stopped, or
// lost the first ABORT or its answer, proves the session quiet once it can.
// It never blocks (the owner's reaper calls it).
func (r *Receiver) Reask() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for s := range r.awaiting {
		s.link.Send(Header{Kind: FrameAbort, Session: s.id})
	}
}

// Endpoint is what writers are given to reach this receiver: host:port for
// tcp, the socket path for shm, the worker address and remote key for ucx.
func (r *Receiver) Endpoint() string { return r.endpoint }

// Register makes a session able to receive into dests. The id must be unique
// among live sessions; on tcp every frame must also carry its key, and the
// first connection that writes the session owns it. onBlock, when not nil, is called from the reader
// after each block lands (health's progress clock); it must not block.
func (r *Receiver) Register(sid SessionID, dests [][]byte, onBlock func(now time.Time)) (*RecvSession, error) {
	id := sid.ID
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, errors.New("kvtransfer: receiver closed")
	}
	if _, dup := r.sessions[id]; dup {
		return nil, fmt.Errorf("kvtransfer: session %d already registered", id)
	}
	s := &RecvSession{id: id, key: sid.Key, dests: dests, done: make(chan struct{}), received: make([]bool, len(dests)), lastProgress: time.Now(), onBlock: onBlock}
	r.sessions[id] = s
	return s, nil
}

// Progress returns bytes landed so far and when the last block landed.
func (r *Receiver) Progress(s *RecvSession) (int64, time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return s.bytes, s.lastProgress
}

// Reading is how many of the session's frames are being read now (tcp).
func (r *Receiver) Reading(s *RecvSession) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return s.writing
}

// Err returns why the session ended, nil when it completed.
func (r *Receiver) Err(s *RecvSession) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return s.err
}

// Finish unregisters a session and calls onQuiesced exactly once, as soon as
// no frame of the session is being read: at once when none is, else from
// the reader that finishes the last one. A read still in progress is cut
// short by closing its connection — a sender stalled mid-block (a stopped
// process) could otherwise hold it forever — so the proof comes promptly
// and is local: this reader is the only writer of the blocks. After Finish
// no byte lands in the session's blocks. It is safe to call for a completed
// session, and twice (the second call does nothing).
func (r *Receiver) Finish(s *RecvSession, onQuiesced func()) {
	r.mu.Lock()
	if s.aborted {
		r.mu.Unlock()
		return
	}
	s.aborted = true
	delete(r.sessions, s.id)
	r.rememberLocked(SessionID{ID: s.id, Key: s.key})
	r.endLocked(s, ErrAborted)
	if s.link != nil && !s.writerDone {
		// A remote writer may still be copying: ask it to stop and wait for
		// its word (DONE or ABORT_ACK) or its link's close.
		s.onQuiesced = onQuiesced
		r.awaiting[s] = struct{}{}
		s.link.Send(Header{Kind: FrameAbort, Session: s.id})
		r.mu.Unlock()
		return
	}
	if s.writing > 0 {
		s.onQuiesced = onQuiesced
		readers := make([]io.Closer, 0, len(s.readers))
		for c := range s.readers {
			readers = append(readers, c)
		}
		r.mu.Unlock()
		for _, c := range readers {
			_ = c.Close()
		}
		return
	}
	r.mu.Unlock()
	onQuiesced()
}

// endLocked ends a session once; later calls keep the first outcome.
func (r *Receiver) endLocked(s *RecvSession, err error) {
	if s.ended {
		return
	}
	s.ended = true
	s.err = err
	close(s.done)
}

// Closed reports whether Close was called (a transport's accept loop stops).
func (r *Receiver) Closed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// Close stops the transport (no more connections, every one closed) and
// waits for its goroutines. Safe to call twice.
func (r *Receiver) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	if r.stop == nil {
		return nil
	}
	return r.stop()
}

// ownerLocked checks a tcp frame against its session: the key must match
// and the session must be unbound or bound to owner (which it binds).
func (s *RecvSession) ownerLocked(owner io.Closer, h Header) error {
	if h.Key != s.key {
		return ErrForeignFrame
	}
	if s.owner == nil {
		s.owner = owner
	} else if s.owner != owner {
		return ErrForeignFrame
	}
	return nil
}

// Vouches reports whether h names a registered session with its key: a
// data connection whose first frame does is a writer of ours, one whose
// first frame does not is closed before it counts against any bound.
func (r *Receiver) Vouches(h Header) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s, ok := r.sessions[h.Session]; ok {
		return s.key == h.Key
	}
	_, recent := r.finished[SessionID{ID: h.Session, Key: h.Key}]
	return recent
}

// rememberLocked records a finished session for Vouches.
func (r *Receiver) rememberLocked(id SessionID) {
	if len(r.finishedLog) == finishedMemory {
		delete(r.finished, r.finishedLog[0])
		r.finishedLog = r.finishedLog[1:]
	}
	r.finished[id] = struct{}{}
	r.finishedLog = append(r.finishedLog, id)
}

// LandDone handles a DONE frame read by owner (tcp): the session completes
// when every block arrived, else fails incomplete. A frame of a session
// owner does not own is ErrForeignFrame: drop owner's connection.
func (r *Receiver) LandDone(owner io.Closer, h Header) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.sessions[h.Session]
	if !ok {
		return nil // aborted or unknown session: nothing to do
	}
	if err := s.ownerLocked(owner, h); err != nil {
		return err
	}
	if s.nReceived != len(s.dests) || int(h.Index) != len(s.dests) {
		r.endLocked(s, fmt.Errorf("%w: %d of %d blocks, sender says %d", ErrIncomplete, s.nReceived, len(s.dests), h.Index))
		return nil
	}
	r.endLocked(s, nil)
	return nil
}

// LandData lands one DATA frame's payload, read by owner (tcp): read
// fills its destination block, or discard skips the payload when the
// session is unknown, finished or the descriptor is bad. A frame of a
// session owner does not own is ErrForeignFrame (nothing read: drop the
// connection); a read error ends the session (connection lost) and is
// returned.
func (r *Receiver) LandData(owner io.Closer, h Header, read func(dst []byte) error, discard func() error) error {
	r.mu.Lock()
	s, ok := r.sessions[h.Session]
	if ok {
		if err := s.ownerLocked(owner, h); err != nil {
			r.mu.Unlock()
			return err
		}
	}
	var dst []byte
	if ok && !s.ended {
		switch {
		case int(h.Index) >= len(s.dests) || int(h.Length) != len(s.dests[h.Index]):
			r.endLocked(s, fmt.Errorf("%w: block %d length %d", ErrBadDescriptor, h.Index, h.Length))
		case s.received[h.Index]:
			r.endLocked(s, fmt.Errorf("%w: block %d sent twice", ErrBadDescriptor, h.Index))
		default:
			dst = s.dests[h.Index]
			s.writing++
			if s.readers == nil {
				s.readers = map[io.Closer]int{}
			}
			s.readers[owner]++
		}
	}
	r.mu.Unlock()
	if dst == nil {
		return discard()
	}
	err := read(dst)

	r.mu.Lock()
	s.writing--
	if s.readers[owner]--; s.readers[owner] == 0 {
		delete(s.readers, owner)
	}
	if err == nil && !s.ended {
		s.received[h.Index] = true
		s.nReceived++
		s.bytes += int64(len(dst))
		s.lastProgress = time.Now()
	}
	if err != nil {
		r.endLocked(s, fmt.Errorf("%w: %v", ErrConnLost, err))
	}
	var quiesced func()
	if s.aborted && s.writing == 0 && s.onQuiesced != nil {
		quiesced, s.onQuiesced = s.onQuiesced, nil
	}
	landed := s.lastProgress
	r.mu.Unlock()
	if err == nil && s.onBlock != nil {
		s.onBlock(landed)
	}
	if quiesced != nil {
		quiesced()
	}
	return err
}
