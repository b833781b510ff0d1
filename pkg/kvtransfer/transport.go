package kvtransfer

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// The transport interface is shaped after NIXL so that a NIXL backend can
// drop in later:
//
//	NIXL                          kvferry
//	registerMem / getLocalMD      the target's pool memory and endpoint (Receiver, shm.Memory),
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

// Injector injects faults into a writer's sessions, for tests and drills
// (package fault implements it). Writers call it before each block (wait
// or fail), for each block's bytes (corrupt a copy), and for their DONE
// and ABORT_ACK words (lose them). A nil Injector injects nothing.
type Injector interface {
	Active(session uint64, i int) bool
	Before(ctx context.Context, session uint64, i int) error
	Payload(session uint64, i int, b []byte) []byte
	LosesNotify(session uint64) bool
	LosesAbortAck() bool
}

// noFault is the Injector of a writer without one.
type noFault struct{}

func (noFault) Active(uint64, int) bool                   { return false }
func (noFault) Before(context.Context, uint64, int) error { return nil }
func (noFault) Payload(_ uint64, _ int, b []byte) []byte  { return b }
func (noFault) LosesNotify(uint64) bool                   { return false }
func (noFault) LosesAbortAck() bool                       { return false }

// Faults is i, or an Injector that injects nothing.
func Faults(i Injector) Injector {
	if i == nil {
		return noFault{}
	}
	return i
}

// Hooks are shared by every writer.
type Hooks struct {
	// Fault, when set, is injected into every session (tests, drills).
	Fault Injector
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
	Write(ctx context.Context, endpoint string, session SessionID, src [][]byte, dst []Desc) (int64, error)
	Close()
}

// CheckDescs rejects destinations that do not match their sources or fall
// outside a target memory of size bytes (a writer checks before it writes).
func CheckDescs(src [][]byte, dst []Desc, size uint64) error {
	if len(src) != len(dst) {
		return fmt.Errorf("%w: %d sources for %d destinations", ErrBadDescriptor, len(src), len(dst))
	}
	for i, d := range dst {
		if d.Length == 0 || d.Length != uint64(len(src[i])) || d.Offset > size || d.Length > size-d.Offset {
			return fmt.Errorf("%w: destination %d [%d, +%d) in %d bytes for a %d-byte block", ErrBadDescriptor, i, d.Offset, d.Length, size, len(src[i]))
		}
	}
	return nil
}

// ErrNoProgress: a write moved nothing for the progress timeout.
var ErrNoProgress = errors.New("kvtransfer: peer took no bytes for the progress timeout")

// ErrNotBound: the receiver refused to grant a session.
var ErrNotBound = errors.New("not bound")

// AwaitBind waits for the receiver's answer to BIND, bounded by ctx and
// progress (0: no bound).
func AwaitBind(ctx context.Context, bind <-chan FrameKind, progress time.Duration) error {
	var timeout <-chan time.Time
	if progress > 0 {
		t := time.NewTimer(progress)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case k := <-bind:
		if k != FrameBindOK {
			return ErrNotBound
		}
		return nil
	case <-ctx.Done():
		// The answer may still be BIND_OK: the writer's DONE releases it.
		return ctx.Err()
	case <-timeout:
		return fmt.Errorf("%w: no answer to bind", ErrNoProgress)
	}
}

// SaysDone reports whether a writer that bound (or tried to bind) session
// and ended with err sends DONE — its word that nothing more is written.
// A drill can lose the word: lose-notify on success, lose-abort-ack when
// the session was aborted or cancelled.
func SaysDone(f Injector, session uint64, err error, aborted bool) bool {
	f = Faults(f)
	switch {
	case err == ErrNotBound:
		return false // never granted: nothing to release
	case err == nil:
		return !f.LosesNotify(session)
	case aborted && f.LosesAbortAck():
		return false
	}
	return true
}

// Refusal turns ErrNotBound into the error Write reports.
func Refusal(err error, session uint64) error {
	if err == ErrNotBound {
		return fmt.Errorf("kvtransfer: receiver refused session %d (finished or unknown)", session)
	}
	return err
}

// WriterSession is a session as a writer of the bind protocol (shm, ucx)
// tracks it.
type WriterSession struct {
	Bind    chan FrameKind // the receiver's answer to BIND, buffered
	Aborted atomic.Bool    // the receiver asked the writer to stop
}

// NewWriterSession returns a session waiting for the receiver's answer.
func NewWriterSession() *WriterSession { return &WriterSession{Bind: make(chan FrameKind, 1)} }

// OnReceiverFrame applies a receiver's frame to the session it names (ss
// nil: this writer is not writing it). It reports whether an ABORT_ACK is
// owed — an ABORT for a session nothing is being written for, unless a
// drill loses acknowledgements — and false in valid for a frame no
// receiver sends.
func OnReceiverFrame(h Header, ss *WriterSession, f Injector) (ackOwed, valid bool) {
	f = Faults(f)
	switch h.Kind {
	case FrameBindOK, FrameBindRefused:
		if ss != nil {
			select {
			case ss.Bind <- h.Kind:
			default:
			}
		}
	case FrameAbort:
		if ss != nil {
			ss.Aborted.Store(true) // the session's DONE answers
			return false, true
		}
		return !f.LosesAbortAck(), true
	default:
		return false, false
	}
	return false, true
}
