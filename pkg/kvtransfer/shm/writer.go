package shm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/internal/dialgroup"
)

// Writer is the initiator side of the shm transport: it maps each peer's
// pool once (per link) and copies blocks straight into their destinations.
// It is safe for concurrent use; sessions to one peer share its link.
type Writer struct {
	kvtransfer.Hooks
	progress time.Duration

	dials  dialgroup.Group[*shmPeer] // one dial per endpoint; never under mu
	mu     sync.Mutex
	peers  map[string]*shmPeer
	closed bool
	wg     sync.WaitGroup // link readers
}

// NewWriter returns a writer with no links. progress bounds each wait on
// the peer (the bind answer, a notification write); zero means none.
func NewWriter(progress time.Duration, hooks kvtransfer.Hooks) *Writer {
	return &Writer{Hooks: hooks, progress: progress, peers: map[string]*shmPeer{}}
}

// Name returns "shm".
func (w *Writer) Name() string { return kvtransfer.TransportShm }

// shmPeer is one link: the unix socket and the mapped pool of one receiver.
// The mapping is unmapped and the socket closed only when the link is dead
// and no session copies through it (users == 0): closing tells the receiver
// that nothing will be written any more, so it must be true.
type shmPeer struct {
	c        *net.UnixConn
	mem      []byte
	fault    kvtransfer.Injector
	progress time.Duration // bounds every frame write
	wmu      sync.Mutex    // frame writes

	mu       sync.Mutex
	sessions map[uint64]*kvtransfer.WriterSession
	users    int
	dead     error
	released bool
}

// ErrPeerClosed: the link to the receiver closed mid-session.
var ErrPeerClosed = errors.New("shm: link closed")

// Write copies src[i] into the peer's destination dst[i] and notifies it,
// returning when the session is terminal; afterwards nothing more is copied
// for it. A done ctx, an ABORT from the receiver or a dead link stops it
// between blocks.
func (w *Writer) Write(ctx context.Context, endpoint string, sid kvtransfer.SessionID, src [][]byte, dst []kvtransfer.Desc) (int64, error) {
	session := sid.ID // the link is authenticated (SO_PEERCRED): no key
	if len(src) != len(dst) {
		return 0, kvtransfer.CheckDescs(src, dst, 0)
	}
	p, err := w.peer(ctx, endpoint)
	if err != nil {
		return 0, err
	}
	if err := kvtransfer.CheckDescs(src, dst, uint64(len(p.mem))); err != nil {
		p.leave(0)
		return 0, err
	}
	ss := kvtransfer.NewWriterSession()
	p.mu.Lock()
	if _, dup := p.sessions[session]; dup {
		p.mu.Unlock()
		p.leave(0)
		return 0, fmt.Errorf("shm: session %d already writing", session)
	}
	p.sessions[session] = ss
	p.mu.Unlock()

	landed, sent, err := w.copySession(ctx, p, ss, session, src, dst)
	// Nothing more is copied for the session: say so, unless a drill loses
	// the word (then only the link's close will prove it).
	var notify error
	if kvtransfer.SaysDone(w.Fault, session, err, ss.Aborted.Load() || ctx.Err() != nil) {
		notify = p.write(kvtransfer.Header{Kind: kvtransfer.FrameDone, Session: session, Index: uint32(landed)}, w.progress)
	}
	p.leave(session)
	if err == nil && notify != nil {
		err = fmt.Errorf("shm: done notification: %w", notify)
	}
	return sent, kvtransfer.Refusal(err, session)
}

// copySession binds the session and copies its blocks; it returns the
// blocks landed and the bytes copied.
func (w *Writer) copySession(ctx context.Context, p *shmPeer, ss *kvtransfer.WriterSession, session uint64, src [][]byte, dst []kvtransfer.Desc) (int, int64, error) {
	if err := p.write(kvtransfer.Header{Kind: kvtransfer.FrameBind, Session: session, Index: uint32(len(src))}, w.progress); err != nil {
		return 0, 0, fmt.Errorf("shm: bind: %w", err)
	}
	if err := kvtransfer.AwaitBind(ctx, ss.Bind, w.progress); err != nil {
		return 0, 0, err
	}
	var sent int64
	for i, b := range src {
		if err := kvtransfer.Faults(w.Fault).Before(ctx, session, i); err != nil {
			return i, sent, err
		}
		if err := p.stopped(ctx, ss); err != nil {
			return i, sent, err
		}
		d := dst[i]
		copy(p.mem[d.Offset:d.Offset+d.Length], kvtransfer.Faults(w.Fault).Payload(session, i, b))
		if err := p.write(kvtransfer.Header{Kind: kvtransfer.FrameLanded, Session: session, Index: uint32(i), Length: uint32(len(b))}, w.progress); err != nil {
			return i + 1, sent, err
		}
		sent += int64(len(b))
		if w.OnBlock != nil {
			w.OnBlock(time.Now())
		}
	}
	if err := kvtransfer.Faults(w.Fault).Before(ctx, session, len(src)); err != nil {
		return len(src), sent, err // a partial fault after every block
	}
	return len(src), sent, nil
}

// stopped reports why a session must stop before its next block.
func (p *shmPeer) stopped(ctx context.Context, ss *kvtransfer.WriterSession) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if ss.Aborted.Load() {
		return kvtransfer.ErrAborted
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dead
}

// write sends one frame, bounded by progress. A failed write kills the
// link (its framing is lost).
func (p *shmPeer) write(h kvtransfer.Header, progress time.Duration) error {
	var b [kvtransfer.HeaderSize]byte
	h.Encode(b[:])
	p.wmu.Lock()
	if progress > 0 {
		_ = p.c.SetWriteDeadline(time.Now().Add(progress))
	}
	_, err := p.c.Write(b[:])
	p.wmu.Unlock()
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("%w: %w", kvtransfer.ErrNoProgress, err)
		}
		p.kill(err)
	}
	return err
}

// peer returns the live link to endpoint, dialling and mapping it when
// there is none, with one more user counted.
// peer returns the live link to endpoint with one more user, dialling it
// when there is none: one dial per endpoint, bounded by ctx and the
// progress timeout, and never in the way of writes to other endpoints.
func (w *Writer) peer(ctx context.Context, endpoint string) (*shmPeer, error) {
	for {
		if p, err := w.live(endpoint); p != nil || err != nil {
			return p, err
		}
		p, dialed, err := w.dials.Do(ctx, endpoint, func() (*shmPeer, error) { return w.dial(ctx, endpoint) })
		switch {
		case dialed:
			return p, err
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case err != nil && !isContextErr(err):
			return nil, err // the dial this caller waited for failed
		}
		// Another caller's dial ended (or its caller left): look again.
	}
}

// dial connects to endpoint and adds the link, with this caller as its
// first user.
func (w *Writer) dial(ctx context.Context, endpoint string) (*shmPeer, error) {
	p, err := dialShm(ctx, endpoint, w.progress)
	if err != nil {
		return nil, err
	}
	p.fault, p.progress = w.Fault, w.progress
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		p.kill(errClosed) // no user: this closes and unmaps it
		return nil, errClosed
	}
	p.users = 1
	w.peers[endpoint] = p
	w.wg.Go(func() { p.readLoop() })
	return p, nil
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

var errClosed = errors.New("shm: writer closed")

// live returns the live link to endpoint with one more user, or nil.
func (w *Writer) live(endpoint string) (*shmPeer, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil, errClosed
	}
	p := w.peers[endpoint]
	if p == nil {
		return nil, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dead != nil {
		return nil, nil
	}
	p.users++
	return p, nil
}

// dialShm connects to a receiver and maps the memory its HELLO hands over,
// within timeout (0: none) and while ctx lives.
func dialShm(ctx context.Context, endpoint string, timeout time.Duration) (*shmPeer, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", endpoint)
	if err != nil {
		return nil, fmt.Errorf("shm: dial shm %s: %w", endpoint, err)
	}
	c := conn.(*net.UnixConn)
	deadline, ok := ctx.Deadline()
	if timeout > 0 && (!ok || time.Now().Add(timeout).Before(deadline)) {
		deadline, ok = time.Now().Add(timeout), true
	}
	if ok {
		_ = c.SetReadDeadline(deadline)
	}
	// A caller that leaves ends the wait for the HELLO at once.
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
	var hb [kvtransfer.HeaderSize]byte
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := c.ReadMsgUnix(hb[:], oob)
	// A caller that left (even as the HELLO came, so that the deadline may
	// now be in the past) fails the dial: stop returns false only then.
	stop()
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	_ = c.SetReadDeadline(time.Time{})
	fd := -1
	if err == nil {
		fd, err = parseRights(oob[:oobn])
	}
	if err == nil && n != kvtransfer.HeaderSize {
		err = fmt.Errorf("%w: %d-byte hello", kvtransfer.ErrBadFrame, n)
	}
	var h kvtransfer.Header
	if err == nil {
		h, err = kvtransfer.DecodeHeader(hb[:], 0)
	}
	if err == nil && (h.Kind != kvtransfer.FrameHello || h.Session == 0 || h.Session > 1<<40) {
		err = fmt.Errorf("%w: hello kind %d size %d", kvtransfer.ErrBadFrame, h.Kind, h.Session)
	}
	if err == nil {
		err = samePeer(c)
	}
	if err == nil {
		err = checkPoolFd(fd, h.Session)
	}
	var mem []byte
	if err == nil {
		mem, err = unix.Mmap(fd, 0, int(h.Session), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	}
	if err == nil {
		adviseHuge(mem)
	}
	if fd >= 0 {
		_ = unix.Close(fd) // the mapping keeps the memory
	}
	if err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("shm: shm hello from %s: %w", endpoint, err)
	}
	return &shmPeer{c: c, mem: mem, sessions: map[uint64]*kvtransfer.WriterSession{}}, nil
}

// checkPoolFd refuses a pool memfd that could SIGBUS us: it must be
// sealed against shrinking and growing, and really as large as the peer
// says (fstat, not its word).
func checkPoolFd(fd int, size uint64) error {
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return fmt.Errorf("%w: pool fd seals: %v", kvtransfer.ErrBadFrame, err)
	}
	if seals&shmSeals != shmSeals {
		return fmt.Errorf("%w: pool memfd not sealed against resizing (seals %#x)", kvtransfer.ErrBadFrame, seals)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%w: pool fd: %v", kvtransfer.ErrBadFrame, err)
	}
	if uint64(st.Size) < size {
		return fmt.Errorf("%w: pool memfd holds %d bytes, the peer says %d", kvtransfer.ErrBadFrame, st.Size, size)
	}
	return nil
}

func parseRights(oob []byte) (int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("%w: hello without a memfd", kvtransfer.ErrBadFrame)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
		return -1, fmt.Errorf("%w: hello without exactly one memfd", kvtransfer.ErrBadFrame)
	}
	return fds[0], nil
}

// readLoop takes the receiver's answers and aborts until the link fails.
func (p *shmPeer) readLoop() {
	var hb [kvtransfer.HeaderSize]byte
	for {
		if _, err := io.ReadFull(p.c, hb[:]); err != nil {
			p.kill(fmt.Errorf("%w: %w", ErrPeerClosed, err))
			return
		}
		h, err := kvtransfer.DecodeHeader(hb[:], 0)
		if err != nil {
			p.kill(err)
			return
		}
		p.mu.Lock()
		ss := p.sessions[h.Session]
		p.mu.Unlock()
		ack, valid := kvtransfer.OnReceiverFrame(h, ss, p.fault)
		if !valid {
			p.kill(fmt.Errorf("%w: kind %d from receiver", kvtransfer.ErrBadFrame, h.Kind))
			return
		}
		if ack {
			if err := p.write(kvtransfer.Header{Kind: kvtransfer.FrameAbortAck, Session: h.Session}, p.progress); err != nil {
				return
			}
		}
	}
}

// kill marks the link dead (sessions stop before their next block) and
// releases it when no session uses it.
func (p *shmPeer) kill(err error) {
	p.mu.Lock()
	if p.dead == nil {
		p.dead = err
	}
	release := p.users == 0 && !p.released
	p.released = p.released || release
	p.mu.Unlock()
	if release {
		p.release()
	}
}

// leave ends one use of the link, forgetting session (0: none registered);
// the last user of a dead link releases it.
func (p *shmPeer) leave(session uint64) {
	p.mu.Lock()
	if session != 0 {
		delete(p.sessions, session)
	}
	p.users--
	release := p.users == 0 && p.dead != nil && !p.released
	p.released = p.released || release
	p.mu.Unlock()
	if release {
		p.release()
	}
}

// release closes the socket (the receiver takes it as proof that nothing
// more is written) and unmaps the memory; no session copies now.
func (p *shmPeer) release() {
	_ = p.c.Close()
	_ = unix.Munmap(p.mem)
}

// Close kills every link; sessions in progress stop before their next
// block and the last one out releases its link. It waits for the links'
// readers. Safe to call twice.
func (w *Writer) Close() {
	w.mu.Lock()
	w.closed = true
	peers := w.peers
	w.peers = map[string]*shmPeer{}
	w.mu.Unlock()
	for _, p := range peers {
		p.kill(errClosed)
	}
	w.wg.Wait()
}
