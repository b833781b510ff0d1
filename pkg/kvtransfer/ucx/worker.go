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
	"math/rand/v2"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// Built reports whether this binary has the ucx transport.
const Built = true

// The ucx transport: the target's pool is registered with UCX (ucp_mem_map)
// and its endpoint string carries the worker address, the packed remote key
// and the pool's base and size — the metadata NIXL's loadRemoteMD takes.
// The writer puts blocks with ucp_put_nbx, flushes the endpoint, and speaks
// the same header-only protocol as shm (BIND, LANDED, DONE, ABORT,
// ABORT_ACK) as active messages, so the receiver's proofs are the shm
// transport's: a writer starts only on a granted session, and only its DONE
// or ABORT_ACK proves the blocks quiet. UCX reports no peer death here (no
// error-handling endpoints), so a writer that dies mid-session leaves its
// session in doubt until the quarantine deadline poisons the blocks.

func ucxErr(what string, st C.ucs_status_t) error {
	return fmt.Errorf("ucx: ucx %s: %s", what, C.GoString(C.ucs_status_string(st)))
}

// ucxWorker is one UCX context and worker, driven by its own goroutine
// (the pump): progress, drain received frames, hand them to onMsg. Every
// other call into the worker takes mu (UCS_THREAD_MODE_SERIALIZED).
type ucxWorker struct {
	s   *C.kvf_state
	efd int
	mu  sync.Mutex

	id       uint64                                // this worker's id: the header of its messages
	onMsg    func(from uint64, frame, addr []byte) // on the pump, without mu; addr: a HELLO
	before   func()                                // on the pump, under mu, each round (queued sends)
	teardown func()                                // after the pump stopped, before the worker goes

	tmu     sync.Mutex
	tick    chan struct{} // closed after each round that had waiters
	waiters int

	stop chan struct{}
	done chan struct{}
}

func newUCXWorker() (*ucxWorker, error) {
	s := C.kvf_new()
	if s == nil {
		return nil, errors.New("ucx: ucx: out of memory")
	}
	var efd C.int
	if st := C.kvf_init(s, &efd); st != C.UCS_OK {
		C.free(unsafe.Pointer(s))
		return nil, ucxErr("init", st)
	}
	return &ucxWorker{s: s, efd: int(efd), id: rand.Uint64() | 1, tick: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}, nil
}

// start runs the pump until close.
func (w *ucxWorker) start() { go w.run() }

func (w *ucxWorker) run() {
	defer close(w.done)
	type msg struct {
		frame [kvtransfer.HeaderSize]byte
		from  uint64
		addr  []byte
	}
	var msgs []msg
	fds := []unix.PollFd{{Fd: int32(w.efd), Events: unix.POLLIN}}
	for {
		w.mu.Lock()
		for C.ucp_worker_progress(w.s.worker) != 0 {
		}
		msgs = msgs[:0]
		for i := range C.size_t(w.s.nmsgs) {
			m := C.kvf_msg_at(w.s, i)
			out := msg{from: uint64(m.from)}
			if m.addr != nil {
				out.addr = C.GoBytes(m.addr, C.int(m.addr_len))
				C.free(m.addr)
			} else {
				copy(out.frame[:], C.GoBytes(unsafe.Pointer(&m.frame[0]), kvtransfer.HeaderSize))
			}
			msgs = append(msgs, out)
		}
		w.s.nmsgs = 0
		if w.before != nil {
			w.before()
		}
		C.kvf_reap(w.s)
		w.mu.Unlock()
		w.wake()
		for _, m := range msgs {
			w.onMsg(m.from, m.frame[:], m.addr)
		}
		select {
		case <-w.stop:
			return
		default:
		}
		if len(msgs) > 0 {
			continue
		}
		w.mu.Lock()
		st := C.ucp_worker_arm(w.s.worker)
		w.mu.Unlock()
		switch {
		case st == C.UCS_ERR_BUSY:
		case w.efd >= 0:
			_, _ = unix.Poll(fds, 1) // woken by traffic or signal; 1 ms bounds a missed wake
		default:
			time.Sleep(50 * time.Microsecond) // no event fd on this transport: poll
		}
	}
}

// wake releases everyone waiting for a round.
func (w *ucxWorker) wake() {
	w.tmu.Lock()
	defer w.tmu.Unlock()
	if w.waiters > 0 {
		close(w.tick)
		w.tick = make(chan struct{})
	}
}

// round returns a channel closed after the next pump round.
func (w *ucxWorker) round() (<-chan struct{}, func()) {
	w.tmu.Lock()
	defer w.tmu.Unlock()
	w.waiters++
	t := w.tick
	return t, func() {
		w.tmu.Lock()
		w.waiters--
		w.tmu.Unlock()
	}
}

// signal wakes the pump (thread safe; never blocks).
func (w *ucxWorker) signal() { C.ucp_worker_signal(w.s.worker) }

// close stops the pump and destroys the worker; call it once nothing else
// uses it.
func (w *ucxWorker) close() {
	close(w.stop)
	w.signal()
	<-w.done
	if w.teardown != nil {
		w.teardown()
	}
	// A worker with sends that never finished is left alive (a crash in
	// UCX otherwise); it only happens when a peer vanished mid-send.
	_ = C.kvf_destroy(w.s)
}

// sendLocked sends a frame on ep; the caller holds mu.
func (w *ucxWorker) sendLocked(ep C.ucp_ep_h, h kvtransfer.Header) error {
	var b [kvtransfer.HeaderSize]byte
	h.Encode(b[:])
	return w.sendBytesLocked(ep, b[:])
}

func (w *ucxWorker) sendBytesLocked(ep C.ucp_ep_h, b []byte) error {
	cb := C.CBytes(b)
	defer C.free(cb)
	if st := C.kvf_am_send(w.s, ep, C.uint64_t(w.id), cb, C.size_t(len(b))); st != C.UCS_OK {
		return ucxErr("send", st)
	}
	return nil
}

// addressLocked returns the worker's address, for peers to connect to.
func (w *ucxWorker) addressLocked() ([]byte, error) {
	var addr *C.ucp_address_t
	var n C.size_t
	if st := C.ucp_worker_get_address(w.s.worker, &addr, &n); st != C.UCS_OK {
		return nil, ucxErr("worker_get_address", st)
	}
	defer C.ucp_worker_release_address(w.s.worker, addr)
	return C.GoBytes(unsafe.Pointer(addr), C.int(n)), nil
}

// connectLocked creates an endpoint to a worker address. The caller
// holds mu.
func (w *ucxWorker) connectLocked(addr []byte) (C.ucp_ep_h, error) {
	a := C.CBytes(addr)
	defer C.free(a)
	var ep C.ucp_ep_h
	if st := C.kvf_ep_create(w.s.worker, a, &ep); st != C.UCS_OK {
		return nil, ucxErr("ep_create", st)
	}
	return ep, nil
}

// wait polls reqs (requests returned by UCX, or nil for "done at once")
// after each pump round until all completed, ctx is done or timeout passes
// with no completion. It returns the first failure. On any return but
// success, requests still running are left to the caller.
func (w *ucxWorker) wait(ctx context.Context, reqs []unsafe.Pointer, timeout time.Duration) ([]unsafe.Pointer, error) {
	var timer <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timer = t.C
	}
	var failed error
	for {
		tick, leave := w.round()
		w.mu.Lock()
		left := reqs[:0]
		for _, r := range reqs {
			st := C.kvf_req_check(r)
			switch {
			case st == C.UCS_INPROGRESS:
				left = append(left, r)
			case st != C.UCS_OK && failed == nil:
				failed = ucxErr("operation", st)
			}
		}
		reqs = left
		w.mu.Unlock()
		if len(reqs) == 0 {
			leave()
			return nil, failed
		}
		w.signal()
		select {
		case <-tick:
			leave()
		case <-ctx.Done():
			leave()
			return reqs, ctx.Err()
		case <-timer:
			leave()
			return reqs, fmt.Errorf("%w: ucx operations did not complete", kvtransfer.ErrNoProgress)
		}
	}
}
