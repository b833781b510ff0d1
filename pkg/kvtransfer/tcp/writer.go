package tcp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// maxIdleConnsPerPeer bounds the idle data connections kept per receiver:
// two covers the common case of two concurrent transfers to one peer
// without holding many sockets open.
const maxIdleConnsPerPeer = 2

// Writer pushes blocks to receivers over pooled data connections. It is safe
// for concurrent use; each push holds one connection exclusively.
type Writer struct {
	kvtransfer.Hooks
	dialer   net.Dialer
	tls      *tls.Config   // nil: plain tcp
	progress time.Duration // a block write that moves nothing for this long fails

	mu     sync.Mutex
	idle   map[string][]idleConn
	closed bool
}

// idleConn is a pooled connection and when it was put back.
type idleConn struct {
	net.Conn
	since time.Time
}

// maxIdleAge is how long a pooled connection is reused: well inside the
// receiver's DataIdleTimeout, after which the receiver closes it.
const maxIdleAge = DataIdleTimeout / 2

// alive reports whether a pooled connection still looks open: the
// receiver never sends on a data connection, so anything to read (EOF, a
// reset, bytes) means it was closed, and a push on it would write into a
// dead socket. It peeks without blocking.
func alive(c net.Conn) bool {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn() // the receiver sends no session tickets: any byte is a close
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	open := false
	var b [1]byte
	err = raw.Read(func(fd uintptr) bool {
		_, _, rerr := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		open = rerr == syscall.EAGAIN
		return true // never wait for readiness
	})
	return err == nil && open
}

// NewWriter returns a writer with no connections.
// progress bounds each block write: a peer that takes no byte for that long
// (stopped, or its reader stuck) fails the push with kvtransfer.ErrNoProgress. Zero
// means no bound (the caller's ctx still applies).
func NewWriter(progress time.Duration) *Writer {
	return &Writer{idle: map[string][]idleConn{}, progress: progress}
}

// NewTLSWriter returns a writer whose data connections are TLS clients
// of cfg (its ServerName is set per endpoint); see NewWriter.
func NewTLSWriter(progress time.Duration, cfg *tls.Config) *Writer {
	s := NewWriter(progress)
	s.tls = cfg
	return s
}

// Name returns "tcp", or "tcp+tls" for a TLS writer.
func (s *Writer) Name() string {
	if s.tls != nil {
		return kvtransfer.TransportTCPTLS
	}
	return kvtransfer.TransportTCP
}

// Write pushes src to the receiver at endpoint. The tcp receiver places
// block i by its position in the session's descriptor list, which it holds
// itself, so dst only has to match src in count.
func (s *Writer) Write(ctx context.Context, endpoint string, session kvtransfer.SessionID, src [][]byte, dst []kvtransfer.Desc) (int64, error) {
	if len(src) != len(dst) {
		return 0, fmt.Errorf("%w: %d sources for %d destinations", kvtransfer.ErrBadDescriptor, len(src), len(dst))
	}
	return s.Push(ctx, endpoint, session, src)
}

// Push writes src[i] into the receiver's destination block i of session,
// then the DONE notification. Blocks are written straight from src with
// vectored writes. A done ctx stops the push between blocks, and unblocks a
// write in progress. When Push returns, it no longer reads src and has
// written nothing more for the session.
func (s *Writer) Push(ctx context.Context, endpoint string, session kvtransfer.SessionID, src [][]byte) (int64, error) {
	c, reused, err := s.conn(ctx, endpoint)
	if err != nil {
		return 0, err
	}
	n, err := s.push(ctx, c, endpoint, session, src)
	if err != nil && reused && n == 0 && ctx.Err() == nil {
		// An idle connection the peer has since closed fails on first use;
		// nothing of the session was sent, so one fresh dial is safe.
		if c, _, err = s.dial(ctx, endpoint); err != nil {
			return 0, err
		}
		n, err = s.push(ctx, c, endpoint, session, src)
	}
	return n, err
}

func (s *Writer) push(ctx context.Context, c net.Conn, endpoint string, session kvtransfer.SessionID, src [][]byte) (int64, error) {
	// A cancelled ctx must unblock a write stuck on a stalled peer.
	stop := context.AfterFunc(ctx, func() { _ = c.SetWriteDeadline(time.Unix(1, 0)) })
	n, err := writeSession(ctx, c, session, src, s.progress, s.Fault, s.OnBlock)
	deadlineSet := !stop()
	switch {
	case err != nil && ctx.Err() != nil:
		err = errors.Join(ctx.Err(), err)
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = fmt.Errorf("%w: %w", kvtransfer.ErrNoProgress, err)
	}
	if err != nil || deadlineSet {
		// A failed write leaves a partial frame; a deadline set by a cancel
		// that came after the last write leaves the conn unusable, but every
		// frame, DONE included, was written: the push itself succeeded.
		_ = c.Close()
		return n, err
	}
	s.put(endpoint, c)
	return n, nil
}

func writeSession(ctx context.Context, c net.Conn, sid kvtransfer.SessionID, src [][]byte, progress time.Duration, fault kvtransfer.Injector, onBlock func(time.Time)) (int64, error) {
	fault = kvtransfer.Faults(fault)
	session := sid.ID
	// One header and one vector for the whole session: a vectored write
	// makes them escape, and per block that would be an allocation each.
	hdr := make([]byte, kvtransfer.HeaderSize)
	vec := make(net.Buffers, 0, 2)
	var bufs net.Buffers
	var sent int64
	for i, b := range src {
		if err := fault.Before(ctx, session, i); err != nil {
			return sent, err
		}
		if progress > 0 {
			// Set before the ctx check: a cancel that fires after the check
			// sets its own (past) deadline over this one.
			_ = c.SetWriteDeadline(time.Now().Add(progress))
		}
		if err := ctx.Err(); err != nil {
			return sent, err
		}
		kvtransfer.Header{Kind: kvtransfer.FrameData, Session: session, Key: sid.Key, Index: uint32(i), Length: uint32(len(b))}.Encode(hdr)
		bufs = append(vec[:0], hdr, fault.Payload(session, i, b))
		if _, err := bufs.WriteTo(c); err != nil {
			return sent, fmt.Errorf("tcp: write block %d: %w", i, err)
		}
		sent += int64(len(b))
		if onBlock != nil {
			onBlock(time.Now())
		}
	}
	if fault.LosesNotify(session) {
		return sent, nil // the notification is lost; the sender believes it sent it
	}
	if err := fault.Before(ctx, session, len(src)); err != nil {
		return sent, err // a partial fault after every block: the DONE never goes
	}
	kvtransfer.Header{Kind: kvtransfer.FrameDone, Session: session, Key: sid.Key, Index: uint32(len(src))}.Encode(hdr)
	if _, err := c.Write(hdr); err != nil {
		return sent, fmt.Errorf("tcp: write done: %w", err)
	}
	return sent, nil
}

// conn returns an idle connection to endpoint (reused = true) or a new one.
func (s *Writer) conn(ctx context.Context, endpoint string) (c net.Conn, reused bool, err error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, false, errors.New("tcp: writer closed")
	}
	for cs := s.idle[endpoint]; len(cs) > 0; cs = s.idle[endpoint] {
		c := cs[len(cs)-1]
		if s.idle[endpoint] = cs[:len(cs)-1]; len(cs) == 1 {
			delete(s.idle, endpoint) // the map holds only peers with idle connections
		}
		if time.Since(c.since) < maxIdleAge && alive(c.Conn) {
			s.mu.Unlock()
			return c.Conn, true, nil
		}
		_ = c.Close()
	}
	s.mu.Unlock()
	return s.dial(ctx, endpoint)
}

func (s *Writer) dial(ctx context.Context, endpoint string) (net.Conn, bool, error) {
	c, err := s.dialer.DialContext(ctx, "tcp", endpoint)
	if err != nil {
		return nil, false, fmt.Errorf("tcp: dial %s: %w", endpoint, err)
	}
	if s.tls == nil {
		return c, false, nil
	}
	cfg := s.tls.Clone()
	if cfg.ServerName, _, err = net.SplitHostPort(endpoint); err != nil {
		_ = c.Close()
		return nil, false, fmt.Errorf("tcp: endpoint %s: %w", endpoint, err)
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = c.Close()
		return nil, false, fmt.Errorf("tcp: tls handshake with %s: %w", endpoint, err)
	}
	return tc, false, nil
}

func (s *Writer) put(endpoint string, c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || len(s.idle[endpoint]) >= maxIdleConnsPerPeer {
		_ = c.Close()
		return
	}
	s.idle[endpoint] = append(s.idle[endpoint], idleConn{Conn: c, since: time.Now()})
}

// Close closes the idle connections. Safe to call twice.
func (s *Writer) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for ep, cs := range s.idle {
		for _, c := range cs {
			_ = c.Close()
		}
		delete(s.idle, ep)
	}
}
