package kvtransfer

import (
	"context"
	"fmt"
	"time"
)

// The transport interface is shaped after NIXL so that a NIXL backend can
// drop in later:
//
//	NIXL                          kvferry
//	registerMem / getLocalMD      the target's pool memory and endpoint (Receiver, ShmMemory),
//	                              sent to the writer in TransferRequest (data_endpoint, destinations)
//	loadRemoteMD                  Writer.Write resolves the endpoint once per peer (pooled
//	                              connections for tcp, the mapped pool for shm)
//	createXferReq + postXferReq   Writer.Write with src / dst descriptor lists; the notification
//	  (WRITE, with notification)  is the DONE frame
//	getXferStatus                 Receiver.Progress / Receiver.Err and the session's Done channel,
//	                              none of which blocks
//	releaseXferReq (may fail)     cancel Write's ctx (the writer stops between blocks) and
//	                              Receiver.Finish, whose onQuiesced is the only proof the blocks
//	                              may be reused; a stalled transport never calls it
//	getNotifs                     the receiver's frames: DONE, LANDED, ABORT_ACK

// Desc is one destination block in the target's registered memory.
type Desc struct {
	Offset uint64
	Length uint64
}

// Hooks are shared by every writer.
type Hooks struct {
	// Fault, when set, is injected into every session (tests, drills).
	Fault *Fault
	// OnBlock, when set, is called after each block is written (health's
	// progress clock); it must not block.
	OnBlock func(now time.Time)
}

// Writer is the initiator side of a transport: it writes a session's
// blocks into a target's memory. Write returns when the session is terminal
// on the writer's side — after it, Write reads src no more and writes
// nothing more for the session.
type Writer interface {
	Name() string
	Write(ctx context.Context, endpoint string, session uint64, src [][]byte, dst []Desc) (int64, error)
	Close()
}

// NewWriter returns the writer of the transport named name. progress
// bounds any one wait on the peer.
func NewWriter(name string, progress time.Duration, hooks Hooks) (Writer, error) {
	switch name {
	case TransportTCP:
		s := NewSender(progress)
		s.Hooks = hooks
		return s, nil
	case TransportShm:
		return NewShmWriter(progress, hooks), nil
	case TransportUCX:
		w, err := NewUCXWriter(progress, hooks)
		if err != nil {
			return nil, err
		}
		return w, nil
	}
	return nil, fmt.Errorf("kvtransfer: unknown transport %q (want %s, %s or %s)", name, TransportTCP, TransportShm, TransportUCX)
}
