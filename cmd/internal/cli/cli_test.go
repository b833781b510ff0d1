package cli

import (
	"net"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// addrListener is a listener that only has an address: WarnPlaintext
// reads nothing else, and tests bind only loopback.
type addrListener struct {
	net.Listener
	addr net.Addr
}

func (l addrListener) Addr() net.Addr { return l.addr }

func TestWarnPlaintext(t *testing.T) {
	public := addrListener{addr: &net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 9100}}
	loop := addrListener{addr: &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 9100}}
	for _, tc := range []struct {
		name string
		tls  bool
		ln   net.Listener
		want int
	}{
		{"plaintext beyond loopback", false, public, 1},
		{"plaintext on loopback", false, loop, 0},
		{"tls beyond loopback", true, public, 0},
	} {
		core, logs := observer.New(zap.WarnLevel)
		WarnPlaintext(zap.New(core), tc.tls, tc.ln, nil)
		if logs.Len() != tc.want {
			t.Errorf("%s: %d warnings, want %d", tc.name, logs.Len(), tc.want)
		}
	}
}
