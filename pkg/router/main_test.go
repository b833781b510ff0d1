package router

import (
	"testing"

	"github.com/kvferry/kvferry/internal/leakcheck"
)

// Every goroutine a test starts (connections, watchers, streams) must end.
func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }
