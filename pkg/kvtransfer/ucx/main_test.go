package ucx

import (
	"bytes"
	"testing"

	"github.com/kvferry/kvferry/pkg/kvtransfer/transfertest"
)

// backends are the ucx rows of the conformance suite (conformance_test.go,
// built with -tags ucx); none without the tag.
var backends []transfertest.Backend

func TestMain(m *testing.M) { transfertest.Main(m, backends...) }

// FuzzUCXEndpoint parses any endpoint string a forged advertisement could
// carry: it is refused or parses into a remote that prints back to an
// endpoint parsing to the same remote.
func FuzzUCXEndpoint(f *testing.F) {
	f.Add(ucxRemote{addr: []byte{1, 2}, rkey: []byte{3}, base: 0x7f00, size: 4096, id: 9}.String())
	f.Add("ucx:::::")
	f.Add("tcp:127.0.0.1:1")
	f.Fuzz(func(t *testing.T, ep string) {
		r, err := parseUCXEndpoint(ep)
		if err != nil {
			return
		}
		again, err := parseUCXEndpoint(r.String())
		if err != nil || !bytes.Equal(again.addr, r.addr) || !bytes.Equal(again.rkey, r.rkey) || again.base != r.base || again.size != r.size || again.id != r.id {
			t.Fatalf("%q parsed to %+v, which prints to %q: %+v %v", ep, r, r.String(), again, err)
		}
	})
}
