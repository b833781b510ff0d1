package kvtransfer

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// The shm transport, same host only. The generation server's pool lives in
// a memfd (ShmMemory); a context server connects to the receiver's unix
// socket, gets the memfd over SCM_RIGHTS, maps it and copies each block
// straight into its destination: one copy in total. The socket carries
// header-only frames (see the package comment): a writer must BIND a
// session, and the receiver grants it only while the session is registered
// and not finished, so a writer never starts on blocks that were returned.
// Once granted, the receiver treats the session's blocks as writable by the
// peer until the writer says otherwise (DONE, ABORT_ACK) or its link closes.
// A writer closes its link only when none of its copies is running, and the
// kernel closes it when the writer dies: both are proof. A stopped writer
// gives none, so a finished session stays in doubt (its blocks quarantined)
// until it wakes and answers, dies, or the quarantine deadline poisons them.

// ShmMemory is pool memory that a peer process can map: a memfd mapped
// shared. The caller keeps it open as long as the pool uses it.
type ShmMemory struct {
	fd  int
	mem []byte
}

// NewShmMemory creates size bytes of shareable memory.
func NewShmMemory(size int) (*ShmMemory, error) {
	if size <= 0 {
		return nil, fmt.Errorf("kvtransfer: shm size %d", size)
	}
	fd, err := unix.MemfdCreate("kvferry-pool", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("kvtransfer: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("kvtransfer: size shm: %w", err)
	}
	// Sealed against resizing: no peer that holds the fd can shrink it
	// under our mapping (a SIGBUS on the next touch) or grow it.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, shmSeals|unix.F_SEAL_SEAL); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("kvtransfer: seal shm: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("kvtransfer: map shm: %w", err)
	}
	adviseHuge(mem)
	return &ShmMemory{fd: fd, mem: mem}, nil
}

// shmSeals are the seals a pool memfd must carry before anyone maps it.
const shmSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW

// samePeer checks with SO_PEERCRED that the process at the other end of c
// runs as our user: the shm socket and memfd are for kvferry's own pair.
func samePeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Getuid() {
		return fmt.Errorf("kvtransfer: shm peer runs as uid %d, we as %d", cred.Uid, os.Getuid())
	}
	return nil
}

// adviseHuge asks for huge pages on a shared mapping: fewer TLB misses on
// the copy. It takes effect only where the kernel allows huge shmem pages
// (transparent_hugepage/shmem_enabled = advise or always); elsewhere it is
// a no-op, so its error is ignored.
func adviseHuge(mem []byte) { _ = unix.Madvise(mem, unix.MADV_HUGEPAGE) }

// Bytes returns the mapping.
func (m *ShmMemory) Bytes() []byte { return m.mem }

// Close unmaps the memory and closes the memfd. Nothing may use Bytes after.
func (m *ShmMemory) Close() error {
	return errors.Join(unix.Munmap(m.mem), unix.Close(m.fd))
}

// ServeShm starts a shm receiver on a unix socket listener, which it owns
// from now on; writers that connect are handed mem. maxBlock bounds a
// LANDED frame's length.
func ServeShm(ln *net.UnixListener, mem *ShmMemory, maxBlock int, lg *zap.Logger) *Receiver {
	r := makeReceiver(ln, maxBlock, lg)
	r.wg.Add(1)
	go r.acceptLoop(func(c net.Conn) { r.shmLoop(c.(*net.UnixConn), mem) })
	return r
}

// ListenShm starts a shm receiver on a unix socket at path (an existing
// file there, a stale socket of an earlier run, is replaced).
func ListenShm(path string, mem *ShmMemory, maxBlock int, lg *zap.Logger) (*Receiver, error) {
	_ = unix.Unlink(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("kvtransfer: listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil { // only our user may connect
		_ = ln.Close()
		return nil, fmt.Errorf("kvtransfer: chmod %s: %w", path, err)
	}
	return ServeShm(ln, mem, maxBlock, lg), nil
}

// link is the receiver's end of one remote writer (shm: its unix socket;
// ucx: its endpoint). Frames to the writer are queued and sent by the
// link's owner, so that a stopped writer can never block the receiver.
type link struct {
	mu     sync.Mutex
	queue  []Header
	notify func() // tells the owner the queue has frames; never blocks
	bound  map[uint64]*RecvSession
}

func newLink(notify func()) *link {
	return &link{notify: notify, bound: map[uint64]*RecvSession{}}
}

// send queues h for the writer; it never blocks.
func (l *link) send(h Header) {
	l.mu.Lock()
	l.queue = append(l.queue, h)
	l.mu.Unlock()
	l.notify()
}

// take returns the queued frames, emptying the queue.
func (l *link) take() []Header {
	l.mu.Lock()
	defer l.mu.Unlock()
	q := l.queue
	l.queue = nil
	return q
}

// sendLoop writes a socket link's queued frames until stop is closed or a
// write fails.
func (l *link) sendLoop(c net.Conn, wake <-chan struct{}, stop <-chan struct{}) {
	var b [HeaderSize]byte
	for {
		select {
		case <-stop:
			return
		case <-wake:
		}
		for _, h := range l.take() {
			h.Encode(b[:])
			if _, err := c.Write(b[:]); err != nil {
				return
			}
		}
	}
}

// frame handles one frame from a remote writer. A frame no writer may
// send answers false: the link is then broken.
func (r *Receiver) frame(l *link, h Header) (quiesced func(), ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch h.Kind {
	case FrameBind:
		l.send(Header{Kind: r.bindLocked(l, h), Session: h.Session})
	case FrameLanded:
		return r.landedLocked(l, h), true
	case FrameDone, FrameAbortAck:
		return r.writerDoneLocked(l, h), true
	default:
		return nil, false
	}
	return nil, true
}

// shmLoop serves one writer: HELLO with the memfd, then its frames until
// the link closes. On close every session the writer was granted is proven
// quiet.
func (r *Receiver) shmLoop(c *net.UnixConn, mem *ShmMemory) {
	defer r.wg.Done()
	wake := make(chan struct{}, 1)
	l := newLink(func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	})
	stop := make(chan struct{})
	var senders sync.WaitGroup
	defer func() {
		close(stop)
		_ = c.Close()
		senders.Wait()
		r.mu.Lock()
		delete(r.conns, c)
		quiesced := r.writerGoneLocked(l)
		r.mu.Unlock()
		for _, q := range quiesced {
			q()
		}
	}()
	if err := samePeer(c); err != nil {
		r.lg.Warn("shm writer refused", zap.Error(err))
		return
	}
	var hb [HeaderSize]byte
	Header{Kind: FrameHello, Session: uint64(len(mem.mem))}.Encode(hb[:])
	if _, _, err := c.WriteMsgUnix(hb[:], unix.UnixRights(mem.fd), nil); err != nil {
		return
	}
	senders.Go(func() { l.sendLoop(c, wake, stop) })
	for {
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			return
		}
		h, err := DecodeHeader(hb[:], r.maxBlock)
		if err != nil {
			r.lg.Warn("bad shm frame", zap.Error(err))
			return
		}
		quiesced, ok := r.frame(l, h)
		if !ok {
			r.lg.Warn("bad shm frame", zap.Uint8("kind", uint8(h.Kind)))
			return
		}
		if quiesced != nil {
			quiesced()
		}
	}
}

// bindLocked grants session h.Session to the link's writer when it is
// registered, unfinished, ungranted and of h.Index blocks.
func (r *Receiver) bindLocked(l *link, h Header) FrameKind {
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
func (r *Receiver) landedLocked(l *link, h Header) func() {
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
func (r *Receiver) writerDoneLocked(l *link, h Header) func() {
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

// writerGoneLocked proves every session still granted to a closed link.
func (r *Receiver) writerGoneLocked(l *link) []func() {
	var qs []func()
	for _, s := range l.bound {
		r.endLocked(s, ErrConnLost)
		if q := r.quietLocked(l, s); q != nil {
			qs = append(qs, q)
		}
	}
	return qs
}

// quietLocked marks s as no longer written by its writer and returns its
// quiescence callback when Finish is waiting for it.
func (r *Receiver) quietLocked(l *link, s *RecvSession) func() {
	delete(l.bound, s.id)
	delete(r.awaiting, s)
	s.writerDone = true
	q := s.onQuiesced
	s.onQuiesced = nil
	return q
}
