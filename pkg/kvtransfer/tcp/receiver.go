// Package tcp is the tcp transport: a receiver whose own readers land
// DATA frames straight in their destination blocks (which gives it a local
// proof of quiescence: it is the only writer of the blocks), and a writer
// that pushes a session's blocks over pooled data connections with
// vectored writes. tcp+tls is the same over mutual TLS (NewTLSWriter, and
// Serve on a tls.Listener).
package tcp

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/internal/netloop"
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
	// FirstFrameTimeout bounds the wait for a new connection's first frame
	// header (and, for tcp+tls, its handshake): a writer sends it as soon
	// as it has dialled. Until that frame names one of our sessions with
	// its key, the connection counts against no bound — MaxConnsPerPeer
	// counts writers, not whoever can reach the port.
	FirstFrameTimeout = 5 * time.Second
)

// Listen starts a receiver on addr. maxBlock bounds a frame's payload.
// Close stops it and waits for its goroutines.
func Listen(addr string, maxBlock int, lg *zap.Logger) (*kvtransfer.Receiver, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("tcp: listen %s: %w", addr, err)
	}
	return Serve(ln, maxBlock, lg), nil
}

// Serve starts a receiver on an open listener (a tls.Listener for
// tcp+tls), which it owns from now on.
func Serve(ln net.Listener, maxBlock int, lg *zap.Logger) *kvtransfer.Receiver {
	return serve(ln, maxBlock, DataIdleTimeout, lg)
}

// reader is the tcp side of a receiver: its data connections.
type reader struct {
	r     *kvtransfer.Receiver
	srv   *netloop.Server
	idle  time.Duration
	first time.Duration // FirstFrameTimeout

	mu      sync.Mutex
	perPeer map[string]int // open data connections by remote host
}

func serve(ln net.Listener, maxBlock int, idle time.Duration, lg *zap.Logger) *kvtransfer.Receiver {
	return serveReader(ln, maxBlock, idle, FirstFrameTimeout, lg).r
}

func serveReader(ln net.Listener, maxBlock int, idle, first time.Duration, lg *zap.Logger) *reader {
	rd := &reader{idle: idle, first: first, perPeer: map[string]int{}}
	rd.r = kvtransfer.NewReceiver(ln.Addr().String(), maxBlock, lg, func() error { return rd.srv.Close() })
	rd.srv = netloop.Serve(ln, rd.readLoop)
	return rd
}

// readLoop reads frames until the connection fails. A malformed header ends
// the connection: frame boundaries are lost after it.
//
// A connection counts against MaxConnsPerPeer only once its first frame
// names one of our sessions with its key (Receiver.Vouches), which must
// arrive within FirstFrameTimeout; any other connection is closed without
// having counted.
func (rd *reader) readLoop(c net.Conn) {
	host := peerHost(c)
	counted := false
	defer func() {
		if !counted {
			return
		}
		rd.mu.Lock()
		if rd.perPeer[host]--; rd.perPeer[host] == 0 {
			delete(rd.perPeer, host)
		}
		rd.mu.Unlock()
	}()
	lg := rd.r.Logger()
	var hb [kvtransfer.HeaderSize]byte
	for {
		wait := rd.idle
		if !counted {
			wait = rd.first
		}
		_ = c.SetReadDeadline(time.Now().Add(wait))
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			return
		}
		h, err := kvtransfer.DecodeHeader(hb[:], rd.r.MaxBlock())
		if err != nil {
			lg.Warn("bad data frame", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
			return
		}
		if !counted {
			if !rd.r.Vouches(h) {
				lg.Debug("data connection closed: its first frame names no session of ours", zap.String("peer", c.RemoteAddr().String()))
				return
			}
			rd.mu.Lock()
			rd.perPeer[host]++
			over := rd.perPeer[host] > MaxConnsPerPeer
			rd.mu.Unlock()
			counted = true
			if over {
				lg.Warn("data connection refused: too many from one peer", zap.String("peer", host), zap.Int("max", MaxConnsPerPeer))
				return
			}
		}
		switch h.Kind {
		case kvtransfer.FrameDone:
			if err := rd.r.LandDone(c, h); err != nil {
				lg.Warn("data connection closed", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
				return
			}
			continue
		case kvtransfer.FrameData:
		default:
			lg.Warn("bad data frame", zap.String("peer", c.RemoteAddr().String()), zap.Uint8("kind", uint8(h.Kind)))
			return
		}
		read := func(dst []byte) error {
			_ = c.SetReadDeadline(time.Now().Add(rd.idle))
			_, err := io.ReadFull(c, dst)
			return err
		}
		discard := func() error {
			_ = c.SetReadDeadline(time.Now().Add(rd.idle))
			_, err := io.CopyN(io.Discard, c, int64(h.Length))
			return err
		}
		if err := rd.r.LandData(c, h, read, discard); err != nil {
			if errors.Is(err, kvtransfer.ErrForeignFrame) {
				lg.Warn("data connection closed", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
			}
			return
		}
	}
}

// peerHost is the remote host of a connection, the unit of the per-peer cap.
func peerHost(c net.Conn) string {
	if host, _, err := net.SplitHostPort(c.RemoteAddr().String()); err == nil {
		return host
	}
	return c.RemoteAddr().String()
}
