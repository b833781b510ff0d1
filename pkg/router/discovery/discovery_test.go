package discovery

import (
	"context"
	"net"
	"slices"
	"testing"

	"github.com/kvferry/kvferry/pkg/router/discovery/discoverytest"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want string
		ok   bool
	}{
		{"127.0.0.1:9100", "127.0.0.1:9100", true},
		{"a:1, b:2", "a:1,b:2", true},
		{"dns:kvferry-ctx.default.svc:9100", "dns:kvferry-ctx.default.svc:9100", true},
		{"dns:nohost", "", false},
		{"", "", false},
		{"a", "", false},
	} {
		src, err := Parse(tc.spec, net.DefaultResolver)
		if (err == nil) != tc.ok || (err == nil && src.String() != tc.want) {
			t.Fatalf("Parse(%q) = %v, %v", tc.spec, src, err)
		}
	}
}

// TestDNSReresolves: a name's addresses are read afresh on every Resolve.
func TestDNSReresolves(t *testing.T) {
	stub := discoverytest.NewStubDNS(t, "ctx.kvferry.test.", [4]byte{127, 0, 0, 2})
	src, err := Parse("dns:ctx.kvferry.test:9100", Resolver(stub.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	got, err := src.Resolve(context.Background())
	if err != nil || !slices.Equal(got, []string{"127.0.0.2:9100"}) {
		t.Fatalf("first: %v %v", got, err)
	}
	stub.Set([4]byte{127, 0, 0, 3}, [4]byte{127, 0, 0, 2})
	got, err = src.Resolve(context.Background())
	if err != nil || !slices.Equal(got, []string{"127.0.0.2:9100", "127.0.0.3:9100"}) {
		t.Fatalf("after the change: %v %v", got, err)
	}
	stub.Set()
	if _, err := src.Resolve(context.Background()); err == nil {
		t.Fatal("an empty answer must be an error, not an empty server set")
	}
}
