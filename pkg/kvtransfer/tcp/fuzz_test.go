package tcp

import (
	"bytes"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// frames encodes headers, each DATA frame followed by its payload.
func frames(hs ...kvtransfer.Header) []byte {
	var b []byte
	for _, h := range hs {
		hb := make([]byte, kvtransfer.HeaderSize)
		h.Encode(hb)
		b = append(b, hb...)
		if h.Kind == kvtransfer.FrameData {
			b = append(b, bytes.Repeat([]byte{1}, int(h.Length))...)
		}
	}
	return b
}

// FuzzTCPFrames feeds any byte stream a peer could send on a data
// connection into the tcp receiver's reader: nothing panics, no byte lands
// outside a session's blocks, a completed session has every block, and
// each session is provably quiet at once once the connection ended.
func FuzzTCPFrames(f *testing.F) {
	d := kvtransfer.FrameData
	f.Add(frames(kvtransfer.Header{Kind: d, Session: 1, Index: 0, Length: 8}, kvtransfer.Header{Kind: d, Session: 1, Index: 1, Length: 8}, kvtransfer.Header{Kind: kvtransfer.FrameDone, Session: 1, Index: 2}))
	f.Add(frames(kvtransfer.Header{Kind: d, Session: 2, Key: 7, Index: 1, Length: 8}, kvtransfer.Header{Kind: d, Session: 2, Key: 1, Index: 0, Length: 8}))
	f.Add(frames(kvtransfer.Header{Kind: d, Session: 1, Index: 5, Length: 8}, kvtransfer.Header{Kind: kvtransfer.FrameDone, Session: 1, Index: 0}))
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := &reader{idle: time.Minute, perPeer: map[string]int{}}
		rd.r = kvtransfer.NewReceiver("pipe", 8, zap.NewNop(), nil)
		// Two sessions of 2 blocks of 8 bytes (ids 1 and 2, keys 0 and 7),
		// cut from one buffer with guard bytes around them.
		const guard = 16
		buf := bytes.Repeat([]byte{0xa5}, guard+4*(8+guard))
		var ss []*kvtransfer.RecvSession
		for i, sid := range []kvtransfer.SessionID{{ID: 1}, {ID: 2, Key: 7}} {
			var dests [][]byte
			for j := range 2 {
				off := guard + (2*i+j)*(8+guard)
				dests = append(dests, buf[off:off+8:off+8])
				clear(dests[j])
			}
			s, err := rd.r.Register(sid, dests, nil)
			if err != nil {
				t.Fatal(err)
			}
			ss = append(ss, s)
		}
		server, client := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			rd.readLoop(server)
			_ = server.Close()
		}()
		_, _ = client.Write(in) // the reader may stop early on a bad frame
		_ = client.Close()
		<-done
		for i := range 5 {
			off := i * (8 + guard)
			if !bytes.Equal(buf[off:off+guard], bytes.Repeat([]byte{0xa5}, guard)) {
				t.Fatal("a frame wrote outside the session's blocks")
			}
		}
		for _, s := range ss {
			select {
			case <-s.Done():
				if n, _ := rd.r.Progress(s); rd.r.Err(s) == nil && n != 16 {
					t.Fatalf("session %d completed with %d of 16 bytes", s.ID(), n)
				}
			default:
			}
			quiet := false
			rd.r.Finish(s, func() { quiet = true })
			if !quiet {
				t.Fatalf("session %d not quiet after its connection closed", s.ID())
			}
		}
	})
}
