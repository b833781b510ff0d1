package router

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestPublicHidesInternalAddresses: a server-side error becomes a fixed
// sentence and the request id (no address, host name or socket path of
// the servers' text survives); client errors pass unchanged.
func TestPublicHidesInternalAddresses(t *testing.T) {
	for _, c := range []struct {
		err       error
		forbidden []string
	}{
		{fail(codes.Unavailable, "context server: dial tcp 10.1.2.3:7001: connect: connection refused"), []string{"10.1.2.3", "7001", "dial"}},
		{fail(codes.Internal, "generate: context server not ready: transport \"shm\" not offered (have \"tcp\")"), []string{"shm", "tcp"}},
		{status.Error(codes.Unavailable, "transfer: dial [fd00::5]:7001 and ctx-0.kvferry.svc.cluster.local:9000 via /tmp/kvferry-1-2.sock"),
			[]string{"fd00::5", "ctx-0.kvferry", "9000", "/tmp/kvferry"}},
		{status.Error(codes.Unavailable, "lookup kvferry-ctx-0.kvferry-ctx.prod.svc: no such host"), []string{"kvferry-ctx", "prod.svc"}},
	} {
		got := Public(c.err, "abc")
		if !strings.HasSuffix(got.Error(), "(request id abc)") || got.Code != CodeOf(c.err) {
			t.Errorf("%q → %q: lost the request id or the code", c.err, got)
		}
		for _, f := range c.forbidden {
			if strings.Contains(got.Error(), f) {
				t.Errorf("%q → %q: still names %q", c.err, got, f)
			}
		}
	}
	bad := fail(codes.InvalidArgument, "the prompt has 9 tokens, the limit is 8")
	if got := Public(bad, "abc"); got.Error() != bad.Error() || got.Code != codes.InvalidArgument {
		t.Errorf("a client error changed: %v", got)
	}
	if Public(errors.New("x"), "id").Code != codes.Unknown {
		t.Error("an unknown error lost its code")
	}
}
