package kvtransfer

import (
	"bytes"
	"net"
	"testing"

	"go.uber.org/zap"
)

// guarded returns n blocks of size cut from one buffer with guard bytes
// between and around them, and a check that no guard byte changed.
func guarded(n, size int) ([][]byte, func() bool) {
	const guard = 16
	buf := bytes.Repeat([]byte{0xa5}, guard+n*(size+guard))
	dests := make([][]byte, n)
	for i := range dests {
		off := guard + i*(size+guard)
		dests[i] = buf[off : off+size : off+size]
		clear(dests[i])
	}
	return dests, func() bool {
		for i := range n + 1 {
			off := i * (size + guard)
			if !bytes.Equal(buf[off:off+guard], bytes.Repeat([]byte{0xa5}, guard)) {
				return false
			}
		}
		return true
	}
}

// fuzzSessions registers two tcp sessions of 2 blocks of 8 bytes: ids 1
// and 2, keys 0 and 7 (seed frames reach them; the fuzzer finds the rest).
func fuzzSessions(t *testing.T, r *Receiver) ([]*RecvSession, func() bool) {
	dests, intact := guarded(4, 8)
	var ss []*RecvSession
	for i, sid := range []SessionID{{ID: 1}, {ID: 2, Key: 7}} {
		s, err := r.Register(sid, dests[2*i:2*i+2], nil)
		if err != nil {
			t.Fatal(err)
		}
		ss = append(ss, s)
	}
	return ss, intact
}

// checkEnd: a session that completed has every block; Finish proves any
// session quiet at once once its connection is gone.
func checkEnd(t *testing.T, r *Receiver, ss []*RecvSession) {
	for _, s := range ss {
		r.mu.Lock()
		ended, err, got := s.ended, s.err, s.nReceived
		r.mu.Unlock()
		if ended && err == nil && got != len(s.dests) {
			t.Fatalf("session %d completed with %d of %d blocks", s.id, got, len(s.dests))
		}
		quiet := false
		r.Finish(s, func() { quiet = true })
		if !quiet {
			t.Fatalf("session %d not quiet after its connection closed", s.id)
		}
	}
}

// frames encodes headers, each DATA frame followed by its payload.
func frames(hs ...Header) []byte {
	var b []byte
	for _, h := range hs {
		hb := make([]byte, HeaderSize)
		h.Encode(hb)
		b = append(b, hb...)
		if h.Kind == FrameData {
			b = append(b, bytes.Repeat([]byte{1}, int(h.Length))...)
		}
	}
	return b
}

// FuzzTCPFrames feeds any byte stream a peer could send on a data
// connection into the tcp receiver's session table: nothing panics, no
// byte lands outside a session's blocks, a completed session has every
// block, and each session is provably quiet once the connection ends.
func FuzzTCPFrames(f *testing.F) {
	f.Add(frames(Header{Kind: FrameData, Session: 1, Index: 0, Length: 8}, Header{Kind: FrameData, Session: 1, Index: 1, Length: 8}, Header{Kind: FrameDone, Session: 1, Index: 2}))
	f.Add(frames(Header{Kind: FrameData, Session: 2, Key: 7, Index: 1, Length: 8}, Header{Kind: FrameData, Session: 2, Key: 1, Index: 0, Length: 8}))
	f.Add(frames(Header{Kind: FrameData, Session: 1, Index: 5, Length: 8}, Header{Kind: FrameDone, Session: 1, Index: 0}))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := makeReceiver(nil, 8, zap.NewNop())
		ss, intact := fuzzSessions(t, r)
		server, client := net.Pipe()
		r.mu.Lock()
		r.conns[server] = struct{}{}
		r.mu.Unlock()
		r.wg.Add(1)
		go r.readLoop(server)
		_, _ = client.Write(in) // the reader may stop early on a bad frame
		_ = client.Close()
		r.wg.Wait()
		if !intact() {
			t.Fatal("a frame wrote outside the session's blocks")
		}
		checkEnd(t, r, ss)
	})
}

// FuzzShmLinkFrames applies any sequence of frames a shm (or ucx) writer
// could send on its link to the receiver: sessions complete only with
// every block, and when the link closes every granted session is proven
// quiet and none stays bound to it.
func FuzzShmLinkFrames(f *testing.F) {
	f.Add(frames(Header{Kind: FrameBind, Session: 1, Index: 2}, Header{Kind: FrameLanded, Session: 1, Index: 0, Length: 8},
		Header{Kind: FrameLanded, Session: 1, Index: 1, Length: 8}, Header{Kind: FrameDone, Session: 1, Index: 2}))
	f.Add(frames(Header{Kind: FrameBind, Session: 2, Index: 2}, Header{Kind: FrameLanded, Session: 2, Index: 9, Length: 8}, Header{Kind: FrameAbortAck, Session: 2}))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := makeReceiver(nil, 8, zap.NewNop())
		ss, _ := fuzzSessions(t, r)
		l := newLink(func() {})
		for len(in) >= HeaderSize {
			h, err := DecodeHeader(in[:HeaderSize], r.maxBlock)
			in = in[HeaderSize:]
			if err != nil {
				break
			}
			q, ok := r.frame(l, h)
			if q != nil {
				q()
			}
			if !ok {
				break
			}
		}
		r.mu.Lock()
		qs := r.writerGoneLocked(l)
		bound := len(l.bound)
		r.mu.Unlock()
		for _, q := range qs {
			q()
		}
		if bound != 0 {
			t.Fatalf("%d sessions still bound to a closed link", bound)
		}
		checkEnd(t, r, ss)
	})
}

// FuzzWriterFrames applies any frame a receiver could send to a writer
// (shm and ucx share the handling): only BIND_OK, BIND_REFUSED and ABORT
// are valid, an ABORT for a session being written marks it aborted, and
// an ack is owed only for a session not being written.
func FuzzWriterFrames(f *testing.F) {
	f.Add(frames(Header{Kind: FrameAbort, Session: 1}), true)
	f.Add(frames(Header{Kind: FrameBindOK, Session: 1}), false)
	f.Fuzz(func(t *testing.T, in []byte, writing bool) {
		if len(in) < HeaderSize {
			return
		}
		h, err := DecodeHeader(in[:HeaderSize], 1<<20)
		if err != nil {
			return
		}
		var ss *writerSession
		if writing {
			ss = newWriterSession()
		}
		ack, valid := onReceiverFrame(h, ss, nil)
		wantValid := h.Kind == FrameBindOK || h.Kind == FrameBindRefused || h.Kind == FrameAbort
		if valid != wantValid {
			t.Fatalf("kind %d: valid %v", h.Kind, valid)
		}
		if ack != (h.Kind == FrameAbort && !writing) {
			t.Fatalf("kind %d writing %v: ack owed %v", h.Kind, writing, ack)
		}
		if writing && h.Kind == FrameAbort && !ss.aborted.Load() {
			t.Fatal("an ABORT did not mark the session aborted")
		}
	})
}

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
