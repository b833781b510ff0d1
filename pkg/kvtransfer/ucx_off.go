//go:build !ucx

package kvtransfer

import (
	"errors"
	"time"

	"go.uber.org/zap"
)

// UCXBuilt reports whether this binary has the ucx transport: build with
// -tags ucx (and libucx-dev) to have it.
const UCXBuilt = false

// ErrNoUCX: the binary was built without the ucx transport.
var ErrNoUCX = errors.New("kvtransfer: this binary is built without the ucx transport (build with -tags ucx)")

// ListenUCX fails: no ucx in this build.
func ListenUCX(int, int, *zap.Logger) (*Receiver, []byte, error) { return nil, nil, ErrNoUCX }

// NewUCXWriter fails: no ucx in this build.
func NewUCXWriter(time.Duration, Hooks) (Writer, error) { return nil, ErrNoUCX }
