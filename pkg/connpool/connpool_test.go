package connpool

import (
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
