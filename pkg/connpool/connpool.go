// Package connpool holds a process's gRPC client connections: one per
// peer address, created on first use, retired after a grace when discovery
// drops the peer.
package connpool

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/kvferry/kvferry/pkg/serving"
)

// Cache holds one client connection per address, created on first use.
// A bounded cache (Bound) holds at most max addresses: a new one evicts
// the least recently used, so a caller fed made-up addresses cannot make
// it hold connections (and their goroutines) without end.
type Cache struct {
	creds grpc.DialOption
	extra []grpc.DialOption // With
	max   int               // 0: unbounded

	mu       sync.Mutex
	conns    map[string]*conn
	retiring map[*grpc.ClientConn]*time.Timer
	closed   bool
}

// conn is a cached connection and its address's last Get (for LRU).
type conn struct {
	cc   *grpc.ClientConn
	used time.Time
}

// EvictGrace is how long an evicted connection stays open for the calls
// still running on it.
const EvictGrace = 10 * time.Second

// With adds dial options (tracing's stats handler) to every connection c
// makes. Call it before first use.
func (c *Cache) With(opts ...grpc.DialOption) *Cache {
	c.extra = append(c.extra, opts...)
	return c
}

// Bound makes c hold at most max addresses (and as many retiring
// connections: beyond that an evicted one closes at once). Call it
// before first use.
func (c *Cache) Bound(max int) *Cache {
	c.max = max
	return c
}

// New returns an empty cache dialling in plaintext, or with creds
// when given (TLSFiles.DialOption).
func New(creds ...grpc.DialOption) *Cache {
	c := &Cache{conns: map[string]*conn{}, retiring: map[*grpc.ClientConn]*time.Timer{}, creds: grpc.WithTransportCredentials(insecure.NewCredentials())}
	if len(creds) > 0 {
		c.creds = creds[0]
	}
	return c
}

// Get returns the connection to addr. grpc.NewClient does not dial, so this
// never blocks.
func (c *Cache) Get(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("connpool: closed")
	}
	now := time.Now()
	if e, ok := c.conns[addr]; ok {
		e.used = now
		return e.cc, nil
	}
	if c.max > 0 && len(c.conns) >= c.max {
		c.evictLocked()
	}
	cc, err := grpc.NewClient(addr, append([]grpc.DialOption{
		c.creds,
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(serving.MaxMessageBytes), grpc.MaxCallSendMsgSize(serving.MaxMessageBytes)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: serving.KeepaliveTime, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	}, c.extra...)...)
	if err != nil {
		return nil, fmt.Errorf("connpool: client for %s: %w", addr, err)
	}
	c.conns[addr] = &conn{cc: cc, used: now}
	return cc, nil
}

// evictLocked retires the least recently used address's connection.
func (c *Cache) evictLocked() {
	var oldest string
	for addr, e := range c.conns {
		if oldest == "" || e.used.Before(c.conns[oldest].used) {
			oldest = addr
		}
	}
	cc := c.conns[oldest].cc
	delete(c.conns, oldest)
	// A connection that is not up carries no running call worth a grace
	// (a made-up address never comes up): it closes at once, as does any
	// beyond max retiring ones.
	if cc.GetState() != connectivity.Ready || len(c.retiring) >= c.max {
		_ = cc.Close()
		return
	}
	c.retireLocked(cc, EvictGrace)
}

// Forget drops the connection to addr (a server discovery removed) and
// closes it after grace, so that requests still running on it finish.
// A later Get dials afresh.
func (c *Cache) Forget(addr string, grace time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.conns[addr]
	if !ok || c.closed {
		return
	}
	delete(c.conns, addr)
	c.retireLocked(e.cc, grace)
}

// retireLocked closes cc after grace.
func (c *Cache) retireLocked(cc *grpc.ClientConn, grace time.Duration) {
	c.retiring[cc] = time.AfterFunc(grace, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.retiring[cc]; ok {
			delete(c.retiring, cc)
			_ = cc.Close()
		}
	})
}

// Len is the number of cached connections (not counting retiring ones).
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.conns)
}

// Close closes every connection, retiring ones included. Safe to call
// twice.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for cc, t := range c.retiring {
		t.Stop()
		_ = cc.Close()
		delete(c.retiring, cc)
	}
	for addr, e := range c.conns {
		_ = e.cc.Close()
		delete(c.conns, addr)
	}
}
