//go:build ucx

package e2e

import (
	"testing"

	"github.com/kvferry/kvferry/test/stack"
)

// TestUCXTransport runs the stack with --transport=ucx on both servers, over
// UCX's shared-memory transports and over its tcp: texts equal the
// Reference and both pools return to idle.
func TestUCXTransport(t *testing.T) {
	for _, tls := range []string{"posix,cma", "tcp"} {
		t.Run(tls, func(t *testing.T) {
			t.Setenv("UCX_TLS", tls) // the servers inherit it
			t.Setenv("UCX_NET_DEVICES", "lo")
			ucx := []string{"--transport=ucx"}
			s := stack.Up(t, binDir, stack.Options{CtxArgs: ucx, GenArgs: ucx})
			c := client(s)
			for _, prompt := range []string{"the quiet river", longPrompt(1200)} {
				expectReference(t, c, prompt, 11)
			}
			checkIdle(t, s)
			s.StopAll(t)
		})
	}
}
