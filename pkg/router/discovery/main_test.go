package discovery

import (
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine a test starts (connections, watchers, streams) must end.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
