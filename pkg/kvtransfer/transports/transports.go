// Package transports picks a transport's writer by name (--transport):
// tcp, shm or ucx (the last only in binaries built with -tags ucx).
package transports

import (
	"fmt"
	"time"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/kvtransfer/shm"
	"github.com/kvferry/kvferry/pkg/kvtransfer/tcp"
	"github.com/kvferry/kvferry/pkg/kvtransfer/ucx"
)

// NewWriter returns the writer of the transport named name. progress
// bounds any one wait on the peer.
func NewWriter(name string, progress time.Duration, hooks kvtransfer.Hooks) (kvtransfer.Writer, error) {
	switch name {
	case kvtransfer.TransportTCP:
		w := tcp.NewWriter(progress)
		w.Hooks = hooks
		return w, nil
	case kvtransfer.TransportShm:
		return shm.NewWriter(progress, hooks), nil
	case kvtransfer.TransportUCX:
		return ucx.NewWriter(progress, hooks)
	}
	return nil, fmt.Errorf("transports: unknown transport %q (want %s, %s or %s)", name, kvtransfer.TransportTCP, kvtransfer.TransportShm, kvtransfer.TransportUCX)
}
