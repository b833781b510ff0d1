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
	r    *kvtransfer.Receiver
	srv  *netloop.Server
	idle time.Duration

	mu      sync.Mutex
	perPeer map[string]int // open data connections by remote host
}

func serve(ln net.Listener, maxBlock int, idle time.Duration, lg *zap.Logger) *kvtransfer.Receiver {
	return serveReader(ln, maxBlock, idle, lg).r
}

func serveReader(ln net.Listener, maxBlock int, idle time.Duration, lg *zap.Logger) *reader {
	rd := &reader{idle: idle, perPeer: map[string]int{}}
	rd.r = kvtransfer.NewReceiver(ln.Addr().String(), maxBlock, lg, func() error { return rd.srv.Close() })
	rd.srv = netloop.Serve(ln, rd.readLoop)
	return rd
}

// readLoop reads frames until the connection fails. A malformed header ends
// the connection: frame boundaries are lost after it.
func (rd *reader) readLoop(c net.Conn) {
	host := peerHost(c)
	rd.mu.Lock()
	rd.perPeer[host]++
	over := rd.perPeer[host] > MaxConnsPerPeer
	rd.mu.Unlock()
	defer func() {
		rd.mu.Lock()
		if rd.perPeer[host]--; rd.perPeer[host] == 0 {
			delete(rd.perPeer, host)
		}
		rd.mu.Unlock()
	}()
	lg := rd.r.Logger()
	if over {
		lg.Warn("data connection refused: too many from one peer", zap.String("peer", host), zap.Int("max", MaxConnsPerPeer))
		return
	}
	var hb [kvtransfer.HeaderSize]byte
	for {
		_ = c.SetReadDeadline(time.Now().Add(rd.idle))
		if _, err := io.ReadFull(c, hb[:]); err != nil {
			return
		}
		h, err := kvtransfer.DecodeHeader(hb[:], rd.r.MaxBlock())
		if err != nil {
			lg.Warn("bad data frame", zap.String("peer", c.RemoteAddr().String()), zap.Error(err))
			return
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
