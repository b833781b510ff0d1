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

// TestUCXLlama: the llama.cpp engine over ucx (shared memory): the known
// text and 20 prompts × {greedy, seeded}, streamed and not, equal the
// in-process reference.
func TestUCXLlama(t *testing.T) {
	t.Setenv("UCX_TLS", "posix,cma")
	ucx := []string{"--transport=ucx"}
	s := stack.Up(t, binDir, stack.Options{Llama: true, CtxArgs: ucx, GenArgs: ucx})
	runLlamaServing(t, s)
	checkIdle(t, s)
	s.StopAll(t)
}
