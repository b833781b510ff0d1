// Package shm is the shm transport, same host only (see receiver.go).
package shm

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/internal/netloop"
)

// The shm transport, same host only. The generation server's pool lives in
// a memfd (Memory); a context server connects to the receiver's unix
// socket, gets the memfd over SCM_RIGHTS, maps it and copies each block
// straight into its destination: one copy in total. The socket carries
// header-only frames (package kvtransfer's frame.go): a writer must BIND a
// session, and the receiver grants it only while the session is registered
// and not finished, so a writer never starts on blocks that were returned.
// Once granted, the receiver treats the session's blocks as writable by the
// peer until the writer says otherwise (DONE, ABORT_ACK) or its link closes.
// A writer closes its link only when none of its copies is running, and the
// kernel closes it when the writer dies: both are proof. A stopped writer
// gives none, so a finished session stays in doubt (its blocks quarantined)
// until it wakes and answers, dies, or the quarantine deadline poisons them.

// Memory is pool memory that a peer process can map: a memfd mapped
// shared. The caller keeps it open as long as the pool uses it.
type Memory struct {
	fd  int
	mem []byte
}

// NewMemory creates size bytes of shareable memory.
func NewMemory(size int) (*Memory, error) {
	if size <= 0 {
		return nil, fmt.Errorf("shm: size %d", size)
	}
	fd, err := unix.MemfdCreate("kvferry-pool", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("shm: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("shm: size: %w", err)
	}
	// Sealed against resizing: no peer that holds the fd can shrink it
	// under our mapping (a SIGBUS on the next touch) or grow it.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, shmSeals|unix.F_SEAL_SEAL); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("shm: seal: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("shm: map: %w", err)
	}
	adviseHuge(mem)
	return &Memory{fd: fd, mem: mem}, nil
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
		return fmt.Errorf("shm: peer runs as uid %d, we as %d", cred.Uid, os.Getuid())
	}
	return nil
}

// adviseHuge asks for huge pages on a shared mapping: fewer TLB misses on
// the copy. It takes effect only where the kernel allows huge shmem pages
// (transparent_hugepage/shmem_enabled = advise or always); elsewhere it is
// a no-op, so its error is ignored.
func adviseHuge(mem []byte) { _ = unix.Madvise(mem, unix.MADV_HUGEPAGE) }

// Bytes returns the mapping.
func (m *Memory) Bytes() []byte { return m.mem }

// Close unmaps the memory and closes the memfd. Nothing may use Bytes after.
func (m *Memory) Close() error {
	return errors.Join(unix.Munmap(m.mem), unix.Close(m.fd))
}

// Serve starts a shm receiver on a unix socket listener, which it owns
// from now on; writers that connect are handed mem. maxBlock bounds a
// LANDED frame's length.
func Serve(ln *net.UnixListener, mem *Memory, maxBlock int, lg *zap.Logger) *kvtransfer.Receiver {
	var srv *netloop.Server
	r := kvtransfer.NewReceiver(ln.Addr().String(), maxBlock, lg, func() error { return srv.Close() })
	srv = netloop.Serve(ln, func(c net.Conn) { serveWriter(r, c.(*net.UnixConn), mem) })
	return r
}

// Listen starts a shm receiver on a unix socket at path (an existing
// file there, a stale socket of an earlier run, is replaced).
func Listen(path string, mem *Memory, maxBlock int, lg *zap.Logger) (*kvtransfer.Receiver, error) {
	_ = unix.Unlink(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("shm: listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil { // only our user may connect
		_ = ln.Close()
		return nil, fmt.Errorf("shm: chmod %s: %w", path, err)
	}
	return Serve(ln, mem, maxBlock, lg), nil
}

// sendLoop writes a socket link's queued frames until stop is closed or a
// write fails.
func sendLoop(l *kvtransfer.Link, c net.Conn, wake <-chan struct{}, stop <-chan struct{}) {
	var b [kvtransfer.HeaderSize]byte
	for {
		select {
		case <-stop:
			return
		case <-wake:
		}
		for _, h := range l.Take() {
			h.Encode(b[:])
			if _, err := c.Write(b[:]); err != nil {
				return
			}
		}
	}
}

// serveWriter serves one writer: HELLO with the memfd, then its frames
// until the link closes. On close every session the writer was granted is
// proven quiet.
func serveWriter(r *kvtransfer.Receiver, c *net.UnixConn, mem *Memory) {
	wake := make(chan struct{}, 1)
	l := kvtransfer.NewLink(func() {
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
		for _, q := range r.LinkGone(l) {
			q()
		}
	}()
	if err := samePeer(c); err != nil {
		r.Logger().Warn("shm writer refused", zap.Error(err))
		return
	}
	var hb [kvtransfer.HeaderSize]byte
	kvtransfer.Header{Kind: kvtransfer.FrameHello, Session: uint64(len(mem.mem))}.Encode(hb[:])
	if _, _, err := c.WriteMsgUnix(hb[:], unix.UnixRights(mem.fd), nil); err != nil {
		return
	}
	senders.Go(func() { sendLoop(l, c, wake, stop) })
	for {
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			return
		}
		h, err := kvtransfer.DecodeHeader(hb[:], r.MaxBlock())
		if err != nil {
			r.Logger().Warn("bad shm frame", zap.Error(err))
			return
		}
		quiesced, ok := r.LinkFrame(l, h)
		if !ok {
			r.Logger().Warn("bad shm frame", zap.Uint8("kind", uint8(h.Kind)))
			return
		}
		if quiesced != nil {
			quiesced()
		}
	}
}
