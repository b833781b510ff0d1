package kvtransfer

import (
	"errors"
	"fmt"
	"io"
	"net"
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

// Bounds on the tcp data port, which anyone who reaches it can connect to.
const (
	// MaxConnsPerPeer bounds the data connections one remote address may
	// hold open; a writer pools two per receiver, so this is far above
	// honest use.
	MaxConnsPerPeer = 64
	// DataIdleTimeout closes a data connection on which no frame started,
	// nor a payload moved, for this long (a writer re-dials on next use).
	DataIdleTimeout = 2 * time.Minute
)

// Receiver is the target side of a transport (NIXL: the agent whose memory
// is registered and written). For tcp it accepts data connections and lands
// DATA frames straight in the destination blocks of registered sessions. It
// is the only writer of those blocks, which gives the tcp transport a local
// proof of quiescence: once a session is aborted and no frame for it is
// being read, no byte can touch its memory again (later frames for it are
// discarded). For shm (ServeShm) the writer is the peer process, which
// copies into the shared pool itself after the receiver granted it the
// session; the proof is then the writer's word (DONE, ABORT_ACK) or its
// end (the link's close, which the kernel does when it dies).
type Receiver struct {
	ln       net.Listener // nil for ucx
	endpoint string       // what writers dial
	closer   func()       // ucx: stops the worker after the links are gone
	maxBlock uint32
	idle     time.Duration // tcp: DataIdleTimeout
	lg       *zap.Logger

	mu       sync.Mutex
	sessions map[uint64]*RecvSession
	conns    map[net.Conn]struct{}
	perPeer  map[string]int            // tcp: open data connections by remote host
	awaiting map[*RecvSession]struct{} // shm: finished, waiting for the writer's word
	closed   bool

	wg sync.WaitGroup
}

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
	readers      map[net.Conn]int // connections reading a block of this session now
	conn         net.Conn         // tcp: the connection the session is bound to (the first that wrote it)
	link         *link            // shm, ucx: the writer granted this session; nil for tcp
	writerDone   bool             // shm: the writer said, or proved by closing, it writes no more
	onQuiesced   func()
	onBlock      func(time.Time)
}

// Done is closed when the session completed (every block and the DONE
// notification arrived) or failed; Err tells which.
func (s *RecvSession) Done() <-chan struct{} { return s.done }

// ID returns the session id that tags the session's frames.
func (s *RecvSession) ID() uint64 { return s.id }

// Listen starts a receiver on addr. maxBlock bounds a frame's payload.
// Close stops it and waits for its goroutines.
func Listen(addr string, maxBlock int, lg *zap.Logger) (*Receiver, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("kvtransfer: listen %s: %w", addr, err)
	}
	return Serve(ln, maxBlock, lg), nil
}

// Serve starts a tcp receiver on an open listener, which it owns from now on.
func Serve(ln net.Listener, maxBlock int, lg *zap.Logger) *Receiver {
	return serve(ln, maxBlock, DataIdleTimeout, lg)
}

func serve(ln net.Listener, maxBlock int, idle time.Duration, lg *zap.Logger) *Receiver {
	r := makeReceiver(ln, maxBlock, lg)
	r.idle = idle
	r.wg.Add(1)
	go r.acceptLoop(r.readLoop)
	return r
}

func makeReceiver(ln net.Listener, maxBlock int, lg *zap.Logger) *Receiver {
	r := &Receiver{ln: ln, maxBlock: uint32(maxBlock), idle: DataIdleTimeout, lg: lg, sessions: map[uint64]*RecvSession{}, conns: map[net.Conn]struct{}{}, perPeer: map[string]int{}, awaiting: map[*RecvSession]struct{}{}}
	if ln != nil {
		r.endpoint = ln.Addr().String()
	}
	return r
}

// Reask sends ABORT again to the writer of every finished session that
// still waits for the writer's word, so that a writer that was stopped, or
// lost the first ABORT or its answer, proves the session quiet once it can.
// It never blocks (the owner's reaper calls it).
func (r *Receiver) Reask() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for s := range r.awaiting {
		s.link.send(Header{Kind: FrameAbort, Session: s.id})
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
	r.endLocked(s, ErrAborted)
	if s.link != nil && !s.writerDone {
		// A remote writer may still be copying: ask it to stop and wait for
		// its word (DONE or ABORT_ACK) or its link's close.
		s.onQuiesced = onQuiesced
		r.awaiting[s] = struct{}{}
		s.link.send(Header{Kind: FrameAbort, Session: s.id})
		r.mu.Unlock()
		return
	}
	if s.writing > 0 {
		s.onQuiesced = onQuiesced
		conns := make([]net.Conn, 0, len(s.readers))
		for c := range s.readers {
			conns = append(conns, c)
		}
		r.mu.Unlock()
		for _, c := range conns {
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

// Close stops accepting, closes every data connection and waits for the
// receiver's goroutines. Safe to call twice.
func (r *Receiver) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	var err error
	if r.ln != nil {
		err = r.ln.Close()
	}
	for c := range r.conns {
		_ = c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	if r.closer != nil {
		r.closer()
	}
	return err
}

func (r *Receiver) acceptLoop(serve func(net.Conn)) {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return // listener closed
		}
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			_ = c.Close()
			return
		}
		r.conns[c] = struct{}{}
		r.wg.Add(1)
		r.mu.Unlock()
		go serve(c)
	}
}

// readLoop reads frames until the connection fails. A malformed header ends
// the connection: frame boundaries are lost after it.
func (r *Receiver) readLoop(c net.Conn) {
	defer r.wg.Done()
	host := peerHost(c)
	r.mu.Lock()
	r.perPeer[host]++
	over := r.perPeer[host] > MaxConnsPerPeer
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.conns, c)
		if r.perPeer[host]--; r.perPeer[host] == 0 {
			delete(r.perPeer, host)
		}
		r.mu.Unlock()
		_ = c.Close()
	}()
	if over {
		r.lg.Warn("data connection refused: too many from one peer", zap.String("peer", host), zap.Int("max", MaxConnsPerPeer))
		return
	}
	var hb [HeaderSize]byte
	for {
		_ = c.SetReadDeadline(time.Now().Add(r.idle))
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			return
		}
		h, err := DecodeHeader(hb[:], r.maxBlock)
		if err != nil {
			r.lg.Warn("bad data frame", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
			return
		}
		switch h.Kind {
		case FrameDone:
			if err := r.done(c, h); err != nil {
				r.lg.Warn("data connection closed", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
				return
			}
			continue
		case FrameData:
		default:
			r.lg.Warn("bad data frame", zap.String("peer", c.RemoteAddr().String()), zap.Uint8("kind", uint8(h.Kind)))
			return
		}
		if err := r.data(c, h); err != nil {
			return
		}
	}
}

// ErrForeignFrame: a tcp frame names a live session but has the wrong key,
// or comes on another connection than the one the session is bound to.
// The frame is dropped and its connection closed; the session is not
// touched (a guesser must not be able to fail someone else's transfer).
var ErrForeignFrame = errors.New("kvtransfer: frame for a session this connection does not own")

// ownerLocked checks a tcp frame against its session: the key must match
// and the session must be unbound or bound to c (which it binds).
func (s *RecvSession) ownerLocked(c net.Conn, h Header) error {
	if h.Key != s.key {
		return ErrForeignFrame
	}
	if s.conn == nil {
		s.conn = c
	} else if s.conn != c {
		return ErrForeignFrame
	}
	return nil
}

func (r *Receiver) done(c net.Conn, h Header) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.sessions[h.Session]
	if !ok {
		return nil // aborted or unknown session: nothing to do
	}
	if err := s.ownerLocked(c, h); err != nil {
		return err
	}
	if s.nReceived != len(s.dests) || int(h.Index) != len(s.dests) {
		r.endLocked(s, fmt.Errorf("%w: %d of %d blocks, sender says %d", ErrIncomplete, s.nReceived, len(s.dests), h.Index))
		return nil
	}
	r.endLocked(s, nil)
	return nil
}

// data reads one DATA frame's payload into its destination block, or
// discards it when the session is unknown, aborted or the descriptor is bad.
func (r *Receiver) data(c net.Conn, h Header) error {
	r.mu.Lock()
	s, ok := r.sessions[h.Session]
	if ok {
		if err := s.ownerLocked(c, h); err != nil {
			r.mu.Unlock()
			r.lg.Warn("data connection closed", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
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
				s.readers = map[net.Conn]int{}
			}
			s.readers[c]++
		}
	}
	r.mu.Unlock()
	_ = c.SetReadDeadline(time.Now().Add(r.idle))
	if dst == nil {
		_, err := io.CopyN(io.Discard, c, int64(h.Length))
		return err
	}
	_, err := io.ReadFull(c, dst)

	r.mu.Lock()
	s.writing--
	if s.readers[c]--; s.readers[c] == 0 {
		delete(s.readers, c)
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

// peerHost is the remote host of a connection, the unit of the per-peer cap.
func peerHost(c net.Conn) string {
	if host, _, err := net.SplitHostPort(c.RemoteAddr().String()); err == nil {
		return host
	}
	return c.RemoteAddr().String()
}
