//go:build !ucx

package ucx

import (
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// Built reports whether this binary has the ucx transport: build with
// -tags ucx (and libucx-dev) to have it.
const Built = false

// ErrNotBuilt: the binary was built without the ucx transport.
var ErrNotBuilt = errors.New("ucx: this binary is built without the ucx transport (build with -tags ucx)")

// Listen fails: no ucx in this build.
func Listen(int, int, *zap.Logger) (*kvtransfer.Receiver, []byte, error) {
	return nil, nil, ErrNotBuilt
}

// NewWriter fails: no ucx in this build.
func NewWriter(time.Duration, kvtransfer.Hooks) (kvtransfer.Writer, error) { return nil, ErrNotBuilt }
