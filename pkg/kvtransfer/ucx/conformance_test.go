//go:build ucx

package ucx

import (
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/transfertest"
)

// The ucx rows: same host over shared memory, and over tcp.
func init() {
	newWriter := func(progress time.Duration, h kvtransfer.Hooks) (kvtransfer.Writer, error) {
		return NewWriter(progress, h)
	}
	backends = append(backends,
		transfertest.Backend{Name: kvtransfer.TransportUCX, Label: "ucx-posix-cma", Env: map[string]string{"UCX_TLS": "posix,cma"}, NoDeathProof: true, Window: ucxWindow,
			Listen: listen, NewWriter: newWriter},
		transfertest.Backend{Name: kvtransfer.TransportUCX, Label: "ucx-tcp", Env: map[string]string{"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}, NoDeathProof: true, Window: ucxWindow,
			Listen: listen, NewWriter: newWriter},
	)
}

// listen starts a receiver over size bytes UCX registered, stopped when
// the test ends.
func listen(t testing.TB, size, maxBlock int) *transfertest.Target {
	t.Helper()
	r, mem, err := Listen(size, maxBlock, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return &transfertest.Target{R: r, Endpoint: r.Endpoint(), Mem: mem}
}

func TestConformance(t *testing.T) { transfertest.Run(t, backends...) }
