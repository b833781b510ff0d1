package kvtransfer

import (
	"bytes"
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

// FuzzLinkFrames applies any sequence of frames a shm or ucx writer could
// send on its link to the receiver: sessions complete only with
// every block, and when the link closes every granted session is proven
// quiet and none stays bound to it.
func FuzzLinkFrames(f *testing.F) {
	f.Add(frames(Header{Kind: FrameBind, Session: 1, Index: 2}, Header{Kind: FrameLanded, Session: 1, Index: 0, Length: 8},
		Header{Kind: FrameLanded, Session: 1, Index: 1, Length: 8}, Header{Kind: FrameDone, Session: 1, Index: 2}))
	f.Add(frames(Header{Kind: FrameBind, Session: 2, Index: 2}, Header{Kind: FrameLanded, Session: 2, Index: 9, Length: 8}, Header{Kind: FrameAbortAck, Session: 2}))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := NewReceiver("link", 8, zap.NewNop(), nil)
		ss, _ := fuzzSessions(t, r)
		l := NewLink(func() {})
		for len(in) >= HeaderSize {
			h, err := DecodeHeader(in[:HeaderSize], r.maxBlock)
			in = in[HeaderSize:]
			if err != nil {
				break
			}
			q, ok := r.LinkFrame(l, h)
			if q != nil {
				q()
			}
			if !ok {
				break
			}
		}
		qs := r.LinkGone(l)
		l.mu.Lock()
		bound := len(l.bound)
		l.mu.Unlock()
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
		var ss *WriterSession
		if writing {
			ss = NewWriterSession()
		}
		ack, valid := OnReceiverFrame(h, ss, nil)
		wantValid := h.Kind == FrameBindOK || h.Kind == FrameBindRefused || h.Kind == FrameAbort
		if valid != wantValid {
			t.Fatalf("kind %d: valid %v", h.Kind, valid)
		}
		if ack != (h.Kind == FrameAbort && !writing) {
			t.Fatalf("kind %d writing %v: ack owed %v", h.Kind, writing, ack)
		}
		if writing && h.Kind == FrameAbort && !ss.Aborted.Load() {
			t.Fatal("an ABORT did not mark the session aborted")
		}
	})
}
