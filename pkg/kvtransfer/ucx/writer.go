//go:build ucx

package ucx

/*
#cgo LDFLAGS: -lucp -lucs
#include "ucx_shim.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// Writer is the initiator side of the ucx transport.
type Writer struct {
	kvtransfer.Hooks
	progress time.Duration
	w        *ucxWorker

	dialMu   sync.Mutex // serialises connects (and Close against them)
	mu       sync.Mutex
	peers    map[string]*ucxPeer
	byID     map[uint64]*ucxPeer // by receiver worker id
	sessions map[uint64]*kvtransfer.WriterSession
	closed   bool
}

type ucxPeer struct {
	ep   C.ucp_ep_h
	rkey C.ucp_rkey_h
	ucxRemote
	dead bool // forced closed; a new Write makes a new one
}

// ucxWindow is how many blocks are put before one flush proves them landed
// (and a fault or a cancel takes effect at the next block either way).
const ucxWindow = 8

// NewWriter returns a writer with its own UCX worker.
func NewWriter(progress time.Duration, hooks kvtransfer.Hooks) (*Writer, error) {
	w, err := newUCXWorker()
	if err != nil {
		return nil, err
	}
	x := &Writer{Hooks: hooks, progress: progress, w: w, peers: map[string]*ucxPeer{}, byID: map[uint64]*ucxPeer{}, sessions: map[uint64]*kvtransfer.WriterSession{}}
	w.onMsg = x.onMsg
	w.start()
	return x, nil
}

// Name returns "ucx".
func (x *Writer) Name() string { return kvtransfer.TransportUCX }

func (x *Writer) onMsg(from uint64, frame, addr []byte) {
	if addr != nil {
		return // receivers send no HELLO
	}
	h, err := kvtransfer.DecodeHeader(frame, 0)
	if err != nil {
		return
	}
	x.mu.Lock()
	ss := x.sessions[h.Session]
	p := x.byID[from]
	x.mu.Unlock()
	if ack, _ := kvtransfer.OnReceiverFrame(h, ss, x.Fault); ack && p != nil {
		x.w.mu.Lock()
		if !p.dead {
			_ = x.w.sendLocked(p.ep, kvtransfer.Header{Kind: kvtransfer.FrameAbortAck, Session: h.Session})
		}
		x.w.mu.Unlock()
	}
}

// peer returns the live endpoint to a receiver, connecting when there is
// none. A write to a connected peer never waits for a connect to another
// one.
func (x *Writer) peer(endpoint string) (*ucxPeer, error) {
	if p, err := x.livePeer(endpoint); p != nil || err != nil {
		return p, err
	}
	// One connect at a time, without x.mu: the pump's onMsg takes x.mu, and
	// the connect waits for the pump's rounds. (Connects share the worker's
	// lock anyway; Close waits for the one in flight.)
	x.dialMu.Lock()
	defer x.dialMu.Unlock()
	if p, err := x.livePeer(endpoint); p != nil || err != nil {
		return p, err // connected while this one waited
	}
	p, err := x.connect(endpoint)
	if err != nil {
		return nil, err
	}
	x.mu.Lock()
	x.peers[endpoint] = p
	x.byID[p.id] = p
	x.mu.Unlock()
	return p, nil
}

// livePeer is the endpoint's live peer, if any.
func (x *Writer) livePeer(endpoint string) (*ucxPeer, error) {
	x.mu.Lock()
	closed, p := x.closed, x.peers[endpoint]
	x.mu.Unlock()
	if closed {
		return nil, errClosed
	}
	if p == nil {
		return nil, nil
	}
	x.w.mu.Lock()
	dead := p.dead
	x.w.mu.Unlock()
	if dead {
		return nil, nil
	}
	return p, nil
}

// connect makes an endpoint to a receiver, finishes its wireup and says
// HELLO.
func (x *Writer) connect(endpoint string) (*ucxPeer, error) {
	rem, err := parseUCXEndpoint(endpoint)
	if err != nil {
		return nil, err
	}
	p := &ucxPeer{ucxRemote: rem}
	rk := C.CBytes(rem.rkey)
	defer C.free(rk)
	x.w.mu.Lock()
	defer x.w.mu.Unlock()
	if p.ep, err = x.w.connectLocked(rem.addr); err != nil {
		return nil, err
	}
	if st := C.ucp_ep_rkey_unpack(p.ep, rk, &p.rkey); st != C.UCS_OK {
		x.closeEpLocked(p)
		return nil, ucxErr("rkey_unpack", st)
	}
	// Finish the wireup before anything can close the endpoint: UCX 1.13's
	// tcp transport aborts the process when an endpoint is torn down with
	// its wireup reply still pending. A flush completes once it is done.
	r := C.kvf_flush(p.ep)
	if st := C.kvf_ptr_status(r); st == C.UCS_INPROGRESS {
		x.w.mu.Unlock()
		left, err := x.w.wait(context.Background(), []unsafe.Pointer{unsafe.Pointer(r)}, max(x.progress, time.Second))
		x.w.mu.Lock()
		if len(left) > 0 || err != nil {
			x.closeEpLocked(p)
			return nil, fmt.Errorf("ucx: ucx connect: %w", err)
		}
	} else if st != C.UCS_OK {
		x.closeEpLocked(p)
		return nil, ucxErr("connect", st)
	}
	// HELLO: the receiver connects back to this worker for its answers.
	ad, err := x.w.addressLocked()
	if err == nil {
		err = x.w.sendBytesLocked(p.ep, ad)
	}
	if err != nil {
		x.closeEpLocked(p)
		return nil, err
	}
	return p, nil
}

// closeEpLocked force-closes a peer's endpoint: UCX cancels what is still
// posted on it. The caller holds x.w.mu.
func (x *Writer) closeEpLocked(p *ucxPeer) {
	if p.rkey != nil {
		C.ucp_rkey_destroy(p.rkey)
		p.rkey = nil
	}
	closeEp(x.w, p.ep)
	p.dead = true
}

// closeEp force-closes ep and progresses the worker until it is closed.
// The caller holds w.mu or owns the stopped worker.
func closeEp(w *ucxWorker, ep C.ucp_ep_h) {
	r := C.kvf_ep_close(ep)
	for C.kvf_ptr_status(r) == C.UCS_INPROGRESS {
		C.ucp_worker_progress(w.s.worker)
		if st := C.ucp_request_check_status(unsafe.Pointer(r)); st != C.UCS_INPROGRESS {
			C.ucp_request_free(unsafe.Pointer(r))
			break
		}
	}
}

// Write puts src[i] at the peer's dst[i], ucxWindow blocks per flush,
// announcing each block once its flush completed.
func (x *Writer) Write(ctx context.Context, endpoint string, sid kvtransfer.SessionID, src [][]byte, dst []kvtransfer.Desc) (int64, error) {
	session := sid.ID // the endpoint is the registered peer: no key
	if len(src) != len(dst) {
		return 0, kvtransfer.CheckDescs(src, dst, 0)
	}
	p, err := x.peer(endpoint)
	if err != nil {
		return 0, err
	}
	if err := kvtransfer.CheckDescs(src, dst, p.size); err != nil {
		return 0, err
	}
	ss := kvtransfer.NewWriterSession()
	x.mu.Lock()
	if _, dup := x.sessions[session]; dup {
		x.mu.Unlock()
		return 0, fmt.Errorf("ucx: session %d already writing", session)
	}
	x.sessions[session] = ss
	x.mu.Unlock()
	defer func() {
		x.mu.Lock()
		delete(x.sessions, session)
		x.mu.Unlock()
	}()

	landed, sent, err := x.putSession(ctx, p, ss, session, src, dst)
	runtime.KeepAlive(src)
	// Puts in doubt may still land: then no word, the receiver keeps the
	// blocks.
	if !errors.Is(err, errUCXInDoubt) && kvtransfer.SaysDone(x.Fault, session, err, ss.Aborted.Load() || ctx.Err() != nil) {
		x.w.mu.Lock()
		nerr := x.w.sendLocked(p.ep, kvtransfer.Header{Kind: kvtransfer.FrameDone, Session: session, Index: uint32(landed)})
		x.w.mu.Unlock()
		x.w.signal()
		if err == nil && nerr != nil {
			err = nerr
		}
	}
	return sent, kvtransfer.Refusal(err, session)
}

var errUCXInDoubt = errors.New("ucx: ucx operations did not complete; endpoint closed")

// putSession binds the session and puts its blocks; it returns the blocks
// announced and the bytes moved.
func (x *Writer) putSession(ctx context.Context, p *ucxPeer, ss *kvtransfer.WriterSession, session uint64, src [][]byte, dst []kvtransfer.Desc) (int, int64, error) {
	x.w.mu.Lock()
	err := x.w.sendLocked(p.ep, kvtransfer.Header{Kind: kvtransfer.FrameBind, Session: session, Index: uint32(len(src))})
	x.w.mu.Unlock()
	if err != nil {
		return 0, 0, err
	}
	x.w.signal()
	if err := kvtransfer.AwaitBind(ctx, ss.Bind, x.progress); err != nil {
		return 0, 0, err
	}
	win := ucxWin{x: x, p: p, session: session, src: src}
	for i := range src {
		if kvtransfer.Faults(x.Fault).Active(session, i) {
			// A fault acts before this block: what is posted lands and is
			// announced first, as on the other transports.
			if err := win.flush(ctx); err != nil {
				return win.landed, win.sent, err
			}
		}
		stop := kvtransfer.Faults(x.Fault).Before(ctx, session, i)
		if stop == nil && ctx.Err() != nil {
			stop = ctx.Err()
		}
		if stop == nil && ss.Aborted.Load() {
			stop = kvtransfer.ErrAborted
		}
		if stop == nil {
			stop = win.put(i, kvtransfer.Faults(x.Fault).Payload(session, i, src[i]), p.base+dst[i].Offset)
		}
		if stop != nil {
			// Settle what is posted (it may land; the receiver must hear
			// of it or keep the blocks in doubt), then stop.
			if err := win.flush(context.Background()); err != nil {
				return win.landed, win.sent, err
			}
			return win.landed, win.sent, stop
		}
		if len(win.pending) == ucxWindow {
			if err := win.flush(ctx); err != nil {
				return win.landed, win.sent, err
			}
		}
	}
	if err := win.flush(ctx); err != nil {
		return win.landed, win.sent, err
	}
	if err := kvtransfer.Faults(x.Fault).Before(ctx, session, len(src)); err != nil {
		return len(src), win.sent, err
	}
	return len(src), win.sent, nil
}

// ucxWin is a session's puts posted since the last flush.
type ucxWin struct {
	x       *Writer
	p       *ucxPeer
	session uint64
	src     [][]byte
	pending []int
	reqs    []unsafe.Pointer
	keep    [][]byte // payloads (corrupted copies) that must live until their put completes
	landed  int      // blocks announced
	sent    int64
}

// put posts block i.
func (w *ucxWin) put(i int, b []byte, raddr uint64) error {
	w.x.w.mu.Lock()
	defer w.x.w.mu.Unlock()
	r := C.kvf_put(w.p.ep, unsafe.Pointer(&b[0]), C.size_t(len(b)), C.uint64_t(raddr), w.p.rkey)
	switch st := C.kvf_ptr_status(r); st {
	case C.UCS_OK:
	case C.UCS_INPROGRESS:
		w.reqs = append(w.reqs, unsafe.Pointer(r))
	default:
		return ucxErr("put", st)
	}
	w.pending = append(w.pending, i)
	w.keep = append(w.keep, b)
	return nil
}

// flush proves the posted puts landed (an endpoint flush) and announces
// them (LANDED each). Puts that neither complete nor cancel within the
// progress timeout are in doubt: the endpoint is force-closed and the
// session gets no word.
func (w *ucxWin) flush(ctx context.Context) error {
	if len(w.pending) == 0 {
		return nil
	}
	x := w.x
	x.w.mu.Lock()
	r := C.kvf_flush(w.p.ep)
	var ferr error
	switch st := C.kvf_ptr_status(r); st {
	case C.UCS_OK:
	case C.UCS_INPROGRESS:
		w.reqs = append(w.reqs, unsafe.Pointer(r))
	default:
		ferr = ucxErr("flush", st)
	}
	x.w.mu.Unlock()
	left, err := x.w.wait(ctx, w.reqs, x.progress)
	if len(left) > 0 {
		x.w.mu.Lock()
		for _, r := range left {
			C.ucp_request_cancel(x.w.s.worker, r)
		}
		x.w.mu.Unlock()
		if left, _ = x.w.wait(context.Background(), left, time.Second); len(left) > 0 {
			x.w.mu.Lock()
			x.closeEpLocked(w.p)
			x.w.mu.Unlock()
			return errUCXInDoubt
		}
	}
	runtime.KeepAlive(w.keep)
	w.reqs, w.keep = w.reqs[:0], w.keep[:0]
	pending := w.pending
	w.pending = w.pending[:0]
	if err = errors.Join(err, ferr); err != nil {
		return err // quiet, not announced: the receiver counts them missing
	}
	x.w.mu.Lock()
	for _, i := range pending {
		if serr := x.w.sendLocked(w.p.ep, kvtransfer.Header{Kind: kvtransfer.FrameLanded, Session: w.session, Index: uint32(i), Length: uint32(len(w.src[i]))}); serr != nil && err == nil {
			err = serr
		}
	}
	x.w.mu.Unlock()
	x.w.signal()
	for _, i := range pending {
		w.landed++
		w.sent += int64(len(w.src[i]))
		if x.OnBlock != nil {
			x.OnBlock(time.Now())
		}
	}
	return err
}

// errClosed: a write after Close.
var errClosed = errors.New("ucx: writer closed")

// Close closes every endpoint and the worker. Writes must have returned.
func (x *Writer) Close() {
	x.dialMu.Lock()
	defer x.dialMu.Unlock()
	x.mu.Lock()
	if x.closed {
		x.mu.Unlock()
		return
	}
	x.closed = true
	peers := x.peers
	x.peers = nil
	x.mu.Unlock()
	x.w.mu.Lock()
	for _, p := range peers {
		if !p.dead {
			x.closeEpLocked(p)
		}
	}
	x.w.mu.Unlock()
	x.w.close()
}
