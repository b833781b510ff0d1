package kvtransfer

import (
	"testing"

	"github.com/kvferry/kvferry/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }
