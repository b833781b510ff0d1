package connpool

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/connectivity"

	"github.com/kvferry/kvferry/internal/leakcheck"
	"github.com/kvferry/kvferry/internal/poll"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// One connection per address; Forget retires it after the grace (a later
// Get makes a new one); Close ends every one, retiring ones too.
func TestCacheLifecycle(t *testing.T) {
	c := New()
	a1, err := c.Get("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	if a2, _ := c.Get("127.0.0.1:1"); a2 != a1 || c.Len() != 1 {
		t.Fatalf("second Get: %p vs %p, %d cached", a2, a1, c.Len())
	}
	c.Forget("127.0.0.1:1", time.Millisecond)
	if c.Len() != 0 {
		t.Fatalf("%d cached after Forget", c.Len())
	}
	poll.Until(t, 10*time.Second, time.Millisecond, "the forgotten connection closed after its grace", func() bool {
		return a1.GetState() == connectivity.Shutdown
	})
	b, _ := c.Get("127.0.0.1:1")
	if b == a1 {
		t.Fatal("Get after Forget returned the retired connection")
	}
	retiring, _ := c.Get("127.0.0.1:2")
	c.Forget("127.0.0.1:2", time.Hour)
	c.Close()
	if b.GetState() != connectivity.Shutdown || retiring.GetState() != connectivity.Shutdown {
		t.Fatalf("after Close: %v, retiring %v", b.GetState(), retiring.GetState())
	}
	if _, err := c.Get("127.0.0.1:3"); err == nil {
		t.Fatal("Get after Close succeeded")
	}
}

// TestBoundedCache: fed 300 addresses, a cache bounded to 4 holds at most
// 4 connections and 4 retiring ones, the most recently used address
// survives, an evicted connection that never came up closes at once, and
// Close ends them all (the leak check after the package's tests counts
// their goroutines).
func TestBoundedCache(t *testing.T) {
	c := New().Bound(4)
	defer c.Close()
	keep, err := c.Get("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	for port := 2; port <= 300; port++ {
		if _, err := c.Get(fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
			t.Fatal(err)
		}
		if again, _ := c.Get("127.0.0.1:1"); again != keep {
			t.Fatalf("after %d addresses the most recently used one was evicted", port)
		}
		c.mu.Lock()
		conns, retiring := len(c.conns), len(c.retiring)
		c.mu.Unlock()
		if conns > 4 || retiring > 4 {
			t.Fatalf("after %d addresses: %d cached, %d retiring; bound 4", port, conns, retiring)
		}
	}
	// Nothing listens at these addresses: an evicted connection closes at
	// once instead of retiring.
	victim, _ := c.Get("127.0.0.1:300")
	for port := 301; port <= 305; port++ {
		_, _ = c.Get(fmt.Sprintf("127.0.0.1:%d", port))
	}
	poll.Until(t, 5*time.Second, time.Millisecond, "an evicted connection that never came up closed at once", func() bool {
		return victim.GetState() == connectivity.Shutdown
	})
}
