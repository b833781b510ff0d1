package tcp

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transfertest"
)

// frame writes one DATA frame (header and payload) or a DONE on c.
func frame(t *testing.T, c net.Conn, h kvtransfer.Header, payload []byte) {
	t.Helper()
	b := make([]byte, kvtransfer.HeaderSize, kvtransfer.HeaderSize+len(payload))
	h.Encode(b)
	if _, err := c.Write(append(b, payload...)); err != nil {
		t.Fatal(err)
	}
}

// closedByPeer reports whether the receiver closed c (a read ends with
// EOF or a reset) within transfertest.ShouldHappen.
func closedByPeer(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(transfertest.ShouldHappen))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// TestForeignFramesCannotTouchASession plays a peer that reaches the data
// port: a frame with a guessed id but the wrong key, and a frame with the
// right key on a second connection (a leaked key) are dropped, their
// connections closed, and the session completes with the owner's bytes.
func TestForeignFramesCannotTouchASession(t *testing.T) {
	const size = 4 << 10
	r := newReceiver(t, size)
	sid := kvtransfer.NewSessionID()
	dst := [][]byte{make([]byte, size), make([]byte, size)}
	s, err := r.Register(sid, dst, nil)
	if err != nil {
		t.Fatal(err)
	}
	src := transfertest.RandomBlocks(2, size, 7)
	dial := func() net.Conn {
		c, err := net.Dial("tcp", r.Endpoint())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	guesser := dial()
	frame(t, guesser, kvtransfer.Header{Kind: kvtransfer.FrameData, Session: sid.ID, Key: sid.Key ^ 1, Index: 0, Length: size}, bytes.Repeat([]byte{0xee}, size))
	if !closedByPeer(guesser) {
		t.Fatal("a frame with the wrong key left its connection open")
	}
	owner := dial()
	frame(t, owner, kvtransfer.Header{Kind: kvtransfer.FrameData, Session: sid.ID, Key: sid.Key, Index: 0, Length: size}, src[0])
	transfertest.Eventually(t, "the owner's first block landed", func() bool {
		n, _ := r.Progress(s)
		return n == size
	})
	thief := dial()
	frame(t, thief, kvtransfer.Header{Kind: kvtransfer.FrameData, Session: sid.ID, Key: sid.Key, Index: 1, Length: size}, bytes.Repeat([]byte{0xee}, size))
	if !closedByPeer(thief) {
		t.Fatal("a second connection wrote into a bound session")
	}
	frame(t, owner, kvtransfer.Header{Kind: kvtransfer.FrameData, Session: sid.ID, Key: sid.Key, Index: 1, Length: size}, src[1])
	frame(t, owner, kvtransfer.Header{Kind: kvtransfer.FrameDone, Session: sid.ID, Key: sid.Key, Index: 2}, nil)
	transfertest.WaitDone(t, s)
	if err := r.Err(s); err != nil {
		t.Fatalf("the owner's session failed: %v", err)
	}
	for i := range dst {
		if !bytes.Equal(dst[i], src[i]) {
			t.Fatalf("block %d holds foreign bytes", i)
		}
	}
}

// TestSenderCarriesTheKey: a real Sender push with a keyed id lands; the
// same push with the key zeroed is refused and the session left intact.
func TestSenderCarriesTheKey(t *testing.T) {
	const size = 4 << 10
	r := newReceiver(t, size)
	snd := NewWriter(0)
	defer snd.Close()
	sid := kvtransfer.NewSessionID()
	dst := [][]byte{make([]byte, size)}
	s, _ := r.Register(sid, dst, nil)
	src := transfertest.RandomBlocks(1, size, 3)
	// The receiver closes the connection on the first foreign frame; the
	// push may or may not see that before it ends, but nothing lands.
	unkeyed := NewWriter(0)
	_, _ = unkeyed.Push(context.Background(), r.Endpoint(), kvtransfer.SessionID{ID: sid.ID}, src)
	unkeyed.Close()
	select {
	case <-s.Done():
		t.Fatalf("an unkeyed push ended the session: %v", r.Err(s))
	default:
	}
	if _, err := snd.Push(context.Background(), r.Endpoint(), sid, src); err != nil {
		t.Fatal(err)
	}
	transfertest.WaitDone(t, s)
	if err := r.Err(s); err != nil || !bytes.Equal(dst[0], src[0]) {
		t.Fatalf("keyed push: %v", err)
	}
}

// TestConnectionsPerPeerAreCapped: 200 connections that never name a
// session hold the port first (before, 64 such sockets locked every writer
// on the host out for two minutes). They count against nothing: the cap's
// 64 writers, each opening with a frame of its own session, all land, one
// writer more is closed, and the idle sockets are closed at the first
// frame's deadline.
func TestConnectionsPerPeerAreCapped(t *testing.T) {
	const size = 1024
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rd := serveReader(ln, size, DataIdleTimeout, 500*time.Millisecond, zap.NewNop())
	r := rd.r
	defer r.Close()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", r.Endpoint())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	idle := make([]net.Conn, 200)
	for i := range idle {
		idle[i] = dial()
	}
	transfertest.Eventually(t, "the idle sockets accepted", func() bool { return rd.srv.Len() == len(idle) })
	writers := make([]net.Conn, MaxConnsPerPeer+1)
	sessions := make([]*kvtransfer.RecvSession, len(writers))
	for i := range writers {
		sid := kvtransfer.NewSessionID()
		s, err := r.Register(sid, [][]byte{make([]byte, size), make([]byte, size)}, nil)
		if err != nil {
			t.Fatal(err)
		}
		sessions[i] = s
		writers[i] = dial()
		frame(t, writers[i], kvtransfer.Header{Kind: kvtransfer.FrameData, Session: sid.ID, Key: sid.Key, Index: 0, Length: size}, make([]byte, size))
		if i < MaxConnsPerPeer {
			transfertest.Eventually(t, "a writer's first block landed", func() bool {
				n, _ := r.Progress(s)
				return n == size
			})
		}
	}
	if !closedByPeer(writers[MaxConnsPerPeer]) {
		t.Fatal("the writer over the cap was kept")
	}
	if n, _ := r.Progress(sessions[MaxConnsPerPeer]); n != 0 {
		t.Fatalf("the writer over the cap landed %d bytes", n)
	}
	for i, c := range idle {
		if !closedByPeer(c) {
			t.Fatalf("idle socket %d kept past the first frame's deadline", i)
		}
	}
	for i, c := range writers[:MaxConnsPerPeer] {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err == nil || !isTimeout(err) {
			t.Fatalf("writer %d under the cap was closed: %v", i, err)
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestIdleDataConnectionIsClosed: a connection that sends nothing is
// closed after the idle timeout.
func TestIdleDataConnectionIsClosed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := serveReader(ln, 1024, 50*time.Millisecond, 50*time.Millisecond, zap.NewNop()).r
	defer r.Close()
	c, err := net.Dial("tcp", r.Endpoint())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !closedByPeer(c) {
		t.Fatal("an idle data connection was kept")
	}
}

// TestSenderSkipsAClosedPooledConnection: after the receiver closed an
// idle pooled connection, the next push dials afresh and lands (a write
// into the dead socket would report success and land nothing).
func TestSenderSkipsAClosedPooledConnection(t *testing.T) {
	const size = 4 << 10
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rd := serveReader(ln, size, 50*time.Millisecond, FirstFrameTimeout, zap.NewNop())
	r := rd.r
	defer r.Close()
	snd := NewWriter(0)
	defer snd.Close()
	for round := range uint64(2) {
		sid := kvtransfer.NewSessionID()
		dst := [][]byte{make([]byte, size)}
		s, _ := r.Register(sid, dst, nil)
		src := transfertest.RandomBlocks(1, size, round)
		if _, err := snd.Push(context.Background(), r.Endpoint(), sid, src); err != nil {
			t.Fatal(err)
		}
		transfertest.WaitDone(t, s)
		if err := r.Err(s); err != nil || !bytes.Equal(dst[0], src[0]) {
			t.Fatalf("round %d: %v", round, err)
		}
		transfertest.Eventually(t, "the idle connection closed by the receiver", func() bool {
			return rd.srv.Len() == 0
		})
	}
}

// tlsPair returns the data-path TLS configs of a generation server
// (listener) and a context server (writer) from one CA, as --data-tls
// builds them, plus a writer config carrying another role.
func tlsPair(t *testing.T) (listener, writer, wrongRole *tls.Config) {
	t.Helper()
	ca, err := identity.NewCA("t", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kp := func(r identity.Role) tls.Certificate {
		c, err := ca.KeyPair([]*url.URL{identity.URI(identity.DefaultTrustDomain, r)}, []string{"127.0.0.1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	listener = &tls.Config{Certificates: []tls.Certificate{kp(identity.GenServer)}, ClientCAs: ca.Pool(), ClientAuth: tls.RequireAndVerifyClientCert,
		VerifyConnection: identity.Expect(identity.DefaultTrustDomain, identity.CtxServer), SessionTicketsDisabled: true, MinVersion: tls.VersionTLS12}
	client := func(r identity.Role) *tls.Config {
		return &tls.Config{Certificates: []tls.Certificate{kp(r)}, RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12,
			VerifyConnection: identity.Expect(identity.DefaultTrustDomain, identity.GenServer)}
	}
	return listener, client(identity.CtxServer), client(identity.Router)
}

// TestDataTLS: a TLS writer's push lands and its pooled connection is
// reused; a plain writer and a writer with another role's certificate
// land nothing, and the session is left for its owner.
func TestDataTLS(t *testing.T) {
	const size = 4 << 10
	lcfg, wcfg, wrong := tlsPair(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rd := serveReader(tls.NewListener(ln, lcfg), size, DataIdleTimeout, FirstFrameTimeout, zap.NewNop())
	r := rd.r
	defer r.Close()
	sid := kvtransfer.NewSessionID()
	dst := [][]byte{make([]byte, size)}
	s, _ := r.Register(sid, dst, nil)
	src := transfertest.RandomBlocks(1, size, 9)
	for _, bad := range []*Writer{NewWriter(time.Second), NewTLSWriter(time.Second, wrong)} {
		_, _ = bad.Push(context.Background(), r.Endpoint(), sid, src)
		bad.Close()
	}
	select {
	case <-s.Done():
		t.Fatalf("a refused writer ended the session: %v", r.Err(s))
	default:
	}
	snd := NewTLSWriter(time.Second, wcfg)
	defer snd.Close()
	if snd.Name() != kvtransfer.TransportTCPTLS {
		t.Fatalf("name %q", snd.Name())
	}
	if _, err := snd.Push(context.Background(), r.Endpoint(), sid, src); err != nil {
		t.Fatal(err)
	}
	transfertest.WaitDone(t, s)
	if err := r.Err(s); err != nil || !bytes.Equal(dst[0], src[0]) {
		t.Fatalf("tls push: %v", err)
	}
	// A second session reuses the pooled TLS connection (no ticket or other
	// byte makes it look closed).
	sid2 := kvtransfer.NewSessionID()
	s2, _ := r.Register(sid2, dst, nil)
	if _, err := snd.Push(context.Background(), r.Endpoint(), sid2, src); err != nil {
		t.Fatal(err)
	}
	transfertest.WaitDone(t, s2)
	conns := rd.srv.Len()
	if conns != 1 {
		t.Fatalf("%d data connections after two pushes, want the pooled one", conns)
	}
}
