package router

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestPublicHidesInternalAddresses: server-side errors keep their reason
// and lose every internal address; client errors pass unchanged.
func TestPublicHidesInternalAddresses(t *testing.T) {
	for _, c := range []struct {
		err       error
		keep      string
		forbidden []string
	}{
		{fail(codes.Unavailable, "context server: dial tcp 10.1.2.3:7001: connect: connection refused"), "connection refused", []string{"10.1.2.3", "7001"}},
		{fail(codes.Internal, "generate: context server not ready: transport \"shm\" not offered (have \"tcp\")"), `transport "shm" not offered`, nil},
		{status.Error(codes.Unavailable, "transfer: dial [fd00::5]:7001 and ctx-0.kvferry.svc.cluster.local:9000 via /tmp/kvferry-1-2.sock"), "transfer: dial",
			[]string{"fd00::5", "ctx-0.kvferry", "9000", "/tmp/kvferry"}},
	} {
		got := Public(c.err, "abc").Error()
		if !strings.Contains(got, c.keep) || !strings.Contains(got, "request id abc") {
			t.Errorf("%q → %q: lost the reason or the request id", c.err, got)
		}
		for _, f := range c.forbidden {
			if strings.Contains(got, f) {
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
