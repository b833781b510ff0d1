package kvtransfer

import (
	"errors"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []Header{
		{Kind: FrameData, Session: 1<<63 + 5, Index: 7, Length: 4096},
		{Kind: FrameDone, Session: 42, Index: 3},
	} {
		var b [HeaderSize]byte
		h.Encode(b[:])
		got, err := DecodeHeader(b[:], 4096)
		if err != nil {
			t.Fatal(err)
		}
		if got != h {
			t.Fatalf("got %+v, want %+v", got, h)
		}
	}
}

func TestDecodeHeaderRejects(t *testing.T) {
	valid := func(h Header) []byte {
		var b [HeaderSize]byte
		h.Encode(b[:])
		return b[:]
	}
	badMagic := valid(Header{Kind: FrameData, Length: 1})
	badMagic[0] ^= 0xff
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"short", make([]byte, 10)},
		{"magic", badMagic},
		{"kind", valid(Header{Kind: 9, Length: 1})},
		{"empty data", valid(Header{Kind: FrameData})},
		{"oversized data", valid(Header{Kind: FrameData, Length: 4097})},
		{"done with payload", valid(Header{Kind: FrameDone, Length: 1})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := DecodeHeader(tc.b, 4096); !errors.Is(err, ErrBadFrame) {
				t.Fatalf("err %v, want ErrBadFrame", err)
			}
		})
	}
}

// FuzzDecodeHeader: the decoder of outside input never panics and only
// accepts headers within bounds that encode back to the same bytes.
func FuzzDecodeHeader(f *testing.F) {
	var b [HeaderSize]byte
	Header{Kind: FrameData, Session: 3, Index: 1, Length: 64}.Encode(b[:])
	f.Add(b[:])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := DecodeHeader(in, 4096)
		if err != nil {
			return
		}
		if h.Kind == FrameData && (h.Length == 0 || h.Length > 4096) {
			t.Fatalf("accepted length %d", h.Length)
		}
		var out [HeaderSize]byte
		h.Encode(out[:])
		h2, err := DecodeHeader(out[:], 4096)
		if err != nil || h2 != h {
			t.Fatalf("re-encode: %+v %v", h2, err)
		}
	})
}
