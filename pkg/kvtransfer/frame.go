// Package kvtransfer moves KV blocks from a context server to a generation
// server. Control messages travel over gRPC (TransferService); bulk bytes
// travel over a dedicated data connection, written straight from pool memory
// and read straight into destination blocks.
//
// The tcp data path is a stream of frames. Each frame is a fixed header
// followed by its payload:
//
//	magic u32 | kind u8 | reserved [3]u8 | session u64 | key u64 | index u32 | length u32
//
// A DATA frame carries one block: index is the destination block's position
// in the session's descriptor list and length its size. A DONE frame (the
// notification of a posted write, in NIXL terms) follows a session's last
// block; its index is the number of blocks sent and length is zero. Integers
// are little endian. Session and key together are the SessionID: 128
// random bits the receiver chose, so a peer that can reach the data port
// but was not told a session cannot guess one (only tcp checks the key;
// the shm and ucx links are authenticated themselves and send zero).
//
// The shm transport uses the same header on a unix socket beside the shared
// mapping, with no payloads: HELLO (target → writer, carries the pool's
// memfd and its size in the session field), BIND (writer asks to write a
// session of index blocks), BIND_OK / BIND_REFUSED, LANDED (block index of
// length bytes was copied into the mapping), DONE (the writer will write
// nothing more for the session; index is the blocks landed), ABORT (target
// → writer: stop) and ABORT_ACK (writer: nothing of that session is being
// written, nor will be).
package kvtransfer

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
)

// ProtocolVersion is the transfer protocol version; both sides must agree
// before any byte moves.
const ProtocolVersion = 2

// Transport names, as --transport and TransferRequest.transport spell them.
const (
	TransportTCP = "tcp"
	// TransportTCPTLS is tcp with every data connection in mutual TLS
	// (--data-tls): the same frames, encrypted and authenticated.
	TransportTCPTLS = "tcp+tls"
	TransportShm    = "shm"
	TransportUCX    = "ucx"
)

// HeaderSize is the size of a frame header in bytes.
const HeaderSize = 32

const frameMagic uint32 = 0x3146564b // "KVF1"

// FrameKind is the kind of a data-path frame.
type FrameKind uint8

// Frame kinds.
const (
	FrameData FrameKind = 1
	FrameDone FrameKind = 2
	// shm link frames; none carries a payload.
	FrameHello       FrameKind = 3
	FrameBind        FrameKind = 4
	FrameBindOK      FrameKind = 5
	FrameBindRefused FrameKind = 6
	FrameLanded      FrameKind = 7
	FrameAbort       FrameKind = 8
	FrameAbortAck    FrameKind = 9
)

// Header is a decoded frame header.
type Header struct {
	Kind    FrameKind
	Session uint64
	Key     uint64
	Index   uint32
	Length  uint32
}

// SessionID names a transfer session on the data path: ID is its name in
// the control messages, Key the secret half that tcp frames must carry.
// The receiver draws both from crypto/rand (NewSessionID).
type SessionID struct{ ID, Key uint64 }

// NewSessionID returns a random session id (never zero) and key.
func NewSessionID() SessionID {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails on Linux
	return SessionID{ID: binary.LittleEndian.Uint64(b[:8]) | 1, Key: binary.LittleEndian.Uint64(b[8:])}
}

// ErrBadFrame is returned for a header that is not a valid frame.
var ErrBadFrame = errors.New("kvtransfer: bad frame")

// Encode writes h into b, which must be at least HeaderSize long.
func (h Header) Encode(b []byte) {
	_ = b[HeaderSize-1]
	binary.LittleEndian.PutUint32(b[0:], frameMagic)
	b[4] = byte(h.Kind)
	b[5], b[6], b[7] = 0, 0, 0
	binary.LittleEndian.PutUint64(b[8:], h.Session)
	binary.LittleEndian.PutUint64(b[16:], h.Key)
	binary.LittleEndian.PutUint32(b[24:], h.Index)
	binary.LittleEndian.PutUint32(b[28:], h.Length)
}

// DecodeHeader parses a frame header. maxLength bounds a DATA frame's payload
// so that a peer cannot make us read an unbounded amount.
func DecodeHeader(b []byte, maxLength uint32) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: %d header bytes", ErrBadFrame, len(b))
	}
	if m := binary.LittleEndian.Uint32(b[0:]); m != frameMagic {
		return Header{}, fmt.Errorf("%w: magic %#x", ErrBadFrame, m)
	}
	h := Header{
		Kind:    FrameKind(b[4]),
		Session: binary.LittleEndian.Uint64(b[8:]),
		Key:     binary.LittleEndian.Uint64(b[16:]),
		Index:   binary.LittleEndian.Uint32(b[24:]),
		Length:  binary.LittleEndian.Uint32(b[28:]),
	}
	switch h.Kind {
	case FrameData, FrameLanded:
		if h.Length == 0 || h.Length > maxLength {
			return Header{}, fmt.Errorf("%w: data length %d (max %d)", ErrBadFrame, h.Length, maxLength)
		}
	case FrameDone, FrameHello, FrameBind, FrameBindOK, FrameBindRefused, FrameAbort, FrameAbortAck:
		if h.Length != 0 {
			return Header{}, fmt.Errorf("%w: kind %d frame with length %d", ErrBadFrame, h.Kind, h.Length)
		}
	default:
		return Header{}, fmt.Errorf("%w: kind %d", ErrBadFrame, h.Kind)
	}
	return h, nil
}
