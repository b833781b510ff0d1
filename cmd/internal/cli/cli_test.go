package cli

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/kvferry/kvferry/pkg/executor"
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

// --model-sha256 stops a process whose GGUF file is not the one named.
func TestModelSHA256(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.gguf")
	if err := os.WriteFile(path, []byte("not really a model"), 0o644); err != nil {
		t.Fatal(err)
	}
	sum, err := executor.FileSHA256(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		sum  string
		want bool
	}{{"", true}, {sum, true}, {strings.ToUpper(sum), true}, {strings.Repeat("0", 64), false}} {
		e := EngineFlags{Engine: executor.EngineLlamaCpp, ModelPath: path, ModelSHA256: tc.sum, FlashAttn: "auto", Slots: 1, PrefillChunk: 1}
		if err := e.Validate(); (err == nil) != tc.want {
			t.Errorf("--model-sha256=%q: %v", tc.sum, err)
		}
	}
}
