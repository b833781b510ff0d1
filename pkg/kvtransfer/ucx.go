//go:build ucx

package kvtransfer

/*
#cgo LDFLAGS: -lucp -lucs
#include <stdlib.h>
#include <string.h>
#include <ucp/api/ucp.h>

// A message the worker received: a frame, or a writer's HELLO with its
// worker address (addr, malloc'd; the receiver connects back to it). from
// is the sending worker's id (the AM header).
typedef struct {
	unsigned char frame[32];
	uint64_t from;
	void *addr;
	size_t addr_len;
} kvf_msg;

// Everything the C side of one worker owns. It lives in C memory: UCX keeps
// a pointer to it (the AM handler's argument).
typedef struct {
	ucp_context_h ctx;
	ucp_worker_h worker;
	kvf_msg *msgs;
	size_t nmsgs, cap;
	void **reqs, **bufs; // AM sends in flight and their buffers
	size_t npend, pcap;
} kvf_state;

// kvf_am_cb queues each message; Go drains the queue after progress, so no
// Go code ever runs inside UCX. Endpoints are never taken from UCX here
// (a reply endpoint can be destroyed under us when its peer goes).
static ucs_status_t kvf_am_cb(void *arg, const void *header, size_t header_length,
                              void *data, size_t length, const ucp_am_recv_param_t *param) {
	kvf_state *s = arg;
	if (header_length != 8 || length == 0 || length > 4096 || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
		return UCS_OK;
	}
	if (s->nmsgs == s->cap) {
		size_t c = s->cap ? 2 * s->cap : 64;
		kvf_msg *m = realloc(s->msgs, c * sizeof(kvf_msg));
		if (m == NULL) {
			return UCS_OK;
		}
		s->msgs = m;
		s->cap = c;
	}
	kvf_msg *m = &s->msgs[s->nmsgs];
	memset(m, 0, sizeof *m);
	memcpy(&m->from, header, 8);
	if (length == 32) {
		memcpy(m->frame, data, 32);
	} else {
		m->addr = malloc(length);
		if (m->addr == NULL) {
			return UCS_OK;
		}
		memcpy(m->addr, data, length);
		m->addr_len = length;
	}
	s->nmsgs++;
	return UCS_OK;
}

static ucs_status_t kvf_init(kvf_state *s, int *efd) {
	ucp_config_t *cfg;
	ucs_status_t st = ucp_config_read(NULL, NULL, &cfg);
	if (st != UCS_OK) {
		return st;
	}
	ucp_params_t p;
	memset(&p, 0, sizeof p);
	p.field_mask = UCP_PARAM_FIELD_FEATURES;
	p.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
	st = ucp_init(&p, cfg, &s->ctx);
	ucp_config_release(cfg);
	if (st != UCS_OK) {
		return st;
	}
	ucp_worker_params_t wp;
	memset(&wp, 0, sizeof wp);
	wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
	wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
	st = ucp_worker_create(s->ctx, &wp, &s->worker);
	if (st != UCS_OK) {
		ucp_cleanup(s->ctx);
		return st;
	}
	ucp_am_handler_param_t hp;
	memset(&hp, 0, sizeof hp);
	hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
	                UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
	hp.id = 1;
	hp.cb = kvf_am_cb;
	hp.arg = s;
	hp.flags = UCP_AM_FLAG_WHOLE_MSG;
	st = ucp_worker_set_am_recv_handler(s->worker, &hp);
	if (st == UCS_OK && ucp_worker_get_efd(s->worker, efd) != UCS_OK) {
		*efd = -1;
	}
	if (st != UCS_OK) {
		ucp_worker_destroy(s->worker);
		ucp_cleanup(s->ctx);
	}
	return st;
}

// kvf_reap frees the AM sends that completed.
static void kvf_reap(kvf_state *s) {
	size_t j = 0;
	for (size_t i = 0; i < s->npend; i++) {
		if (ucp_request_check_status(s->reqs[i]) == UCS_INPROGRESS) {
			s->reqs[j] = s->reqs[i];
			s->bufs[j] = s->bufs[i];
			j++;
			continue;
		}
		ucp_request_free(s->reqs[i]);
		free(s->bufs[i]);
	}
	s->npend = j;
}

// kvf_am_send sends len bytes of data with the 8-byte id as the AM header.
static ucs_status_t kvf_am_send(kvf_state *s, ucp_ep_h ep, uint64_t id, const void *data, size_t len) {
	unsigned char *buf = malloc(8 + len);
	if (buf == NULL) {
		return UCS_ERR_NO_MEMORY;
	}
	memcpy(buf, &id, 8);
	memcpy(buf + 8, data, len);
	if (s->npend == s->pcap) {
		size_t c = s->pcap ? 2 * s->pcap : 64;
		void **r = realloc(s->reqs, c * sizeof(void *));
		void **b = r ? realloc(s->bufs, c * sizeof(void *)) : NULL;
		if (r) s->reqs = r;
		if (b) s->bufs = b;
		if (!r || !b) {
			free(buf);
			return UCS_ERR_NO_MEMORY;
		}
		s->pcap = c;
	}
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	ucs_status_ptr_t r = ucp_am_send_nbx(ep, 1, buf, 8, buf + 8, len, &p);
	if (r == NULL) {
		free(buf);
		return UCS_OK;
	}
	if (UCS_PTR_IS_ERR(r)) {
		free(buf);
		return UCS_PTR_STATUS(r);
	}
	s->reqs[s->npend] = r;
	s->bufs[s->npend] = buf;
	s->npend++;
	return UCS_OK;
}

// kvf_destroy lets sends in flight finish for a bounded number of progress
// calls (the endpoints are force-closed by then, which fails theirs), then
// destroys the worker and the context. Destroying a worker with requests
// outstanding crashes UCX 1.13 later, so when some never finish it leaks
// the worker instead and answers how many were left.
static size_t kvf_destroy(kvf_state *s) {
	for (int i = 0; i < 10000 && s->npend > 0; i++) {
		ucp_worker_progress(s->worker);
		kvf_reap(s);
	}
	if (s->npend > 0) {
		return s->npend;
	}
	ucp_worker_destroy(s->worker);
	ucp_cleanup(s->ctx);
	free(s->msgs);
	free(s->reqs);
	free(s->bufs);
	free(s);
	return 0;
}

// kvf_ep_create connects to a peer's worker, without peer error handling:
// UCX 1.13's shared-memory transports refuse it, and with it on tcp UCX
// destroys the receiver's reply endpoints behind its back when a writer
// goes. A peer that goes away shows as operations that do not complete
// (bounded by the writer's progress timeout).
static ucs_status_t kvf_ep_create(ucp_worker_h w, const void *addr, ucp_ep_h *ep) {
	ucp_ep_params_t p;
	memset(&p, 0, sizeof p);
	p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
	p.address = addr;
	return ucp_ep_create(w, &p, ep);
}

static ucs_status_ptr_t kvf_ep_close(ucp_ep_h ep) {
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
	p.flags = UCP_EP_CLOSE_FLAG_FORCE;
	return ucp_ep_close_nbx(ep, &p);
}

static ucs_status_ptr_t kvf_put(ucp_ep_h ep, const void *buf, size_t len, uint64_t raddr, ucp_rkey_h rkey) {
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	return ucp_put_nbx(ep, buf, len, raddr, rkey, &p);
}

static ucs_status_ptr_t kvf_flush(ucp_ep_h ep) {
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	return ucp_ep_flush_nbx(ep, &p);
}

// kvf_ptr_status: UCS_OK when the operation completed at once, an error,
// or UCS_INPROGRESS when r is a request to poll.
static ucs_status_t kvf_ptr_status(ucs_status_ptr_t r) {
	if (r == NULL) {
		return UCS_OK;
	}
	if (UCS_PTR_IS_ERR(r)) {
		return UCS_PTR_STATUS(r);
	}
	return UCS_INPROGRESS;
}

// kvf_req_check returns a request's status, freeing it once complete.
static ucs_status_t kvf_req_check(void *r) {
	ucs_status_t st = ucp_request_check_status(r);
	if (st != UCS_INPROGRESS) {
		ucp_request_free(r);
	}
	return st;
}

// kvf_mem_alloc has UCX allocate and register len bytes, in the memory its
// transports reach fastest (shared memory a same-host peer can attach for
// posix), and returns where.
static ucs_status_t kvf_mem_alloc(ucp_context_h c, size_t len, ucp_mem_h *memh, void **addr) {
	ucp_mem_map_params_t p;
	memset(&p, 0, sizeof p);
	p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
	p.address = NULL;
	p.length = len;
	p.flags = UCP_MEM_MAP_ALLOCATE;
	ucs_status_t st = ucp_mem_map(c, &p, memh);
	if (st != UCS_OK) {
		return st;
	}
	ucp_mem_attr_t a;
	memset(&a, 0, sizeof a);
	a.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
	st = ucp_mem_query(*memh, &a);
	if (st != UCS_OK || a.length < len) {
		ucp_mem_unmap(c, *memh);
		return st != UCS_OK ? st : UCS_ERR_NO_MEMORY;
	}
	*addr = a.address;
	return UCS_OK;
}

static kvf_state *kvf_new(void) { return calloc(1, sizeof(kvf_state)); }
static kvf_msg *kvf_msg_at(kvf_state *s, size_t i) { return &s->msgs[i]; }
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// UCXBuilt reports whether this binary has the ucx transport.
const UCXBuilt = true

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
	return fmt.Errorf("kvtransfer: ucx %s: %s", what, C.GoString(C.ucs_status_string(st)))
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
		return nil, errors.New("kvtransfer: ucx: out of memory")
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
		frame [HeaderSize]byte
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
				copy(out.frame[:], C.GoBytes(unsafe.Pointer(&m.frame[0]), HeaderSize))
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
func (w *ucxWorker) sendLocked(ep C.ucp_ep_h, h Header) error {
	var b [HeaderSize]byte
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
			return reqs, fmt.Errorf("%w: ucx operations did not complete", ErrNoProgress)
		}
	}
}

// ListenUCX starts a ucx receiver over size bytes of pool memory that UCX
// allocates and registers (shared memory a same-host writer attaches and
// copies into directly; elsewhere what the NIC can reach). It returns the
// memory, which lives until the receiver is closed: the pool must not be
// used after Close.
func ListenUCX(size, maxBlock int, lg *zap.Logger) (*Receiver, []byte, error) {
	w, err := newUCXWorker()
	if err != nil {
		return nil, nil, err
	}
	var memh C.ucp_mem_h
	var base unsafe.Pointer
	if st := C.kvf_mem_alloc(w.s.ctx, C.size_t(size), &memh, &base); st != C.UCS_OK {
		C.kvf_destroy(w.s)
		return nil, nil, ucxErr("mem_map", st)
	}
	buf := unsafe.Slice((*byte)(base), size)
	var rkey unsafe.Pointer
	var rkeyLen C.size_t
	if st := C.ucp_rkey_pack(w.s.ctx, memh, &rkey, &rkeyLen); st != C.UCS_OK {
		C.ucp_mem_unmap(w.s.ctx, memh)
		C.kvf_destroy(w.s)
		return nil, nil, ucxErr("rkey_pack", st)
	}
	rk := C.GoBytes(rkey, C.int(rkeyLen))
	C.ucp_rkey_buffer_release(rkey)
	ad, err := w.addressLocked()
	if err != nil {
		C.ucp_mem_unmap(w.s.ctx, memh)
		C.kvf_destroy(w.s)
		return nil, nil, err
	}

	r := makeReceiver(nil, maxBlock, lg)
	r.endpoint = ucxRemote{addr: ad, rkey: rk, base: uint64(uintptr(unsafe.Pointer(&buf[0]))), size: uint64(len(buf)), id: w.id}.String()
	// One link per writer (by its worker id), over an endpoint this
	// receiver made to the address of the writer's HELLO. Touched by the
	// pump only.
	type ucxLink struct {
		ep C.ucp_ep_h
		*link
	}
	links := map[uint64]*ucxLink{}
	w.onMsg = func(from uint64, frame, addr []byte) {
		if addr != nil {
			if links[from] != nil {
				return
			}
			w.mu.Lock()
			ep, err := w.connectLocked(addr)
			w.mu.Unlock()
			if err != nil {
				lg.Warn("ucx connect to writer", zap.Error(err))
				return
			}
			links[from] = &ucxLink{ep: ep, link: newLink(w.signal)}
			return
		}
		l := links[from]
		if l == nil {
			lg.Warn("ucx frame from a writer that said no hello")
			return
		}
		h, err := DecodeHeader(frame, r.maxBlock)
		if err != nil {
			lg.Warn("bad ucx frame", zap.Error(err))
			return
		}
		q, ok := r.frame(l.link, h)
		if !ok {
			lg.Warn("bad ucx frame", zap.Uint8("kind", uint8(h.Kind)))
		}
		if q != nil {
			q()
		}
	}
	w.before = func() {
		for _, l := range links {
			for _, h := range l.take() {
				if err := w.sendLocked(l.ep, h); err != nil {
					lg.Debug("ucx answer", zap.Error(err))
				}
			}
		}
	}
	w.teardown = func() {
		// The endpoints to writers go first (force: pending answers fail),
		// then the pool's registration.
		for _, l := range links {
			closeEp(w, l.ep)
		}
		C.ucp_mem_unmap(w.s.ctx, memh)
	}
	r.closer = w.close
	w.start()
	return r, buf, nil
}

// UCXWriter is the initiator side of the ucx transport.
type UCXWriter struct {
	Hooks
	progress time.Duration
	w        *ucxWorker

	dialMu   sync.Mutex // serialises connects (and Close against them)
	mu       sync.Mutex
	peers    map[string]*ucxPeer
	byID     map[uint64]*ucxPeer // by receiver worker id
	sessions map[uint64]*writerSession
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

// NewUCXWriter returns a writer with its own UCX worker.
func NewUCXWriter(progress time.Duration, hooks Hooks) (*UCXWriter, error) {
	w, err := newUCXWorker()
	if err != nil {
		return nil, err
	}
	x := &UCXWriter{Hooks: hooks, progress: progress, w: w, peers: map[string]*ucxPeer{}, byID: map[uint64]*ucxPeer{}, sessions: map[uint64]*writerSession{}}
	w.onMsg = x.onMsg
	w.start()
	return x, nil
}

// Name returns "ucx".
func (x *UCXWriter) Name() string { return TransportUCX }

func (x *UCXWriter) onMsg(from uint64, frame, addr []byte) {
	if addr != nil {
		return // receivers send no HELLO
	}
	h, err := DecodeHeader(frame, 0)
	if err != nil {
		return
	}
	x.mu.Lock()
	ss := x.sessions[h.Session]
	p := x.byID[from]
	x.mu.Unlock()
	if ack, _ := onReceiverFrame(h, ss, x.Fault); ack && p != nil {
		x.w.mu.Lock()
		if !p.dead {
			_ = x.w.sendLocked(p.ep, Header{Kind: FrameAbortAck, Session: h.Session})
		}
		x.w.mu.Unlock()
	}
}

// peer returns the live endpoint to a receiver, connecting when there is
// none. A write to a connected peer never waits for a connect to another
// one.
func (x *UCXWriter) peer(endpoint string) (*ucxPeer, error) {
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
func (x *UCXWriter) livePeer(endpoint string) (*ucxPeer, error) {
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
func (x *UCXWriter) connect(endpoint string) (*ucxPeer, error) {
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
			return nil, fmt.Errorf("kvtransfer: ucx connect: %w", err)
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
func (x *UCXWriter) closeEpLocked(p *ucxPeer) {
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
func (x *UCXWriter) Write(ctx context.Context, endpoint string, sid SessionID, src [][]byte, dst []Desc) (int64, error) {
	session := sid.ID // the endpoint is the registered peer: no key
	if len(src) != len(dst) {
		return 0, checkDescs(src, dst, 0)
	}
	p, err := x.peer(endpoint)
	if err != nil {
		return 0, err
	}
	if err := checkDescs(src, dst, p.size); err != nil {
		return 0, err
	}
	ss := newWriterSession()
	x.mu.Lock()
	if _, dup := x.sessions[session]; dup {
		x.mu.Unlock()
		return 0, fmt.Errorf("kvtransfer: session %d already writing", session)
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
	if !errors.Is(err, errUCXInDoubt) && saysDone(x.Fault, session, err, ss.aborted.Load() || ctx.Err() != nil) {
		x.w.mu.Lock()
		nerr := x.w.sendLocked(p.ep, Header{Kind: FrameDone, Session: session, Index: uint32(landed)})
		x.w.mu.Unlock()
		x.w.signal()
		if err == nil && nerr != nil {
			err = nerr
		}
	}
	return sent, refusal(err, session)
}

var errUCXInDoubt = errors.New("kvtransfer: ucx operations did not complete; endpoint closed")

// putSession binds the session and puts its blocks; it returns the blocks
// announced and the bytes moved.
func (x *UCXWriter) putSession(ctx context.Context, p *ucxPeer, ss *writerSession, session uint64, src [][]byte, dst []Desc) (int, int64, error) {
	x.w.mu.Lock()
	err := x.w.sendLocked(p.ep, Header{Kind: FrameBind, Session: session, Index: uint32(len(src))})
	x.w.mu.Unlock()
	if err != nil {
		return 0, 0, err
	}
	x.w.signal()
	if err := awaitBind(ctx, ss.bind, x.progress); err != nil {
		return 0, 0, err
	}
	win := ucxWin{x: x, p: p, session: session, src: src}
	for i := range src {
		if x.Fault.active(session, i) {
			// A fault acts before this block: what is posted lands and is
			// announced first, as on the other transports.
			if err := win.flush(ctx); err != nil {
				return win.landed, win.sent, err
			}
		}
		stop := x.Fault.before(ctx, session, i)
		if stop == nil && ctx.Err() != nil {
			stop = ctx.Err()
		}
		if stop == nil && ss.aborted.Load() {
			stop = ErrAborted
		}
		if stop == nil {
			stop = win.put(i, x.Fault.payload(session, i, src[i]), p.base+dst[i].Offset)
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
	if err := x.Fault.before(ctx, session, len(src)); err != nil {
		return len(src), win.sent, err
	}
	return len(src), win.sent, nil
}

// ucxWin is a session's puts posted since the last flush.
type ucxWin struct {
	x       *UCXWriter
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
		if serr := x.w.sendLocked(w.p.ep, Header{Kind: FrameLanded, Session: w.session, Index: uint32(i), Length: uint32(len(w.src[i]))}); serr != nil && err == nil {
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

// Close closes every endpoint and the worker. Writes must have returned.
func (x *UCXWriter) Close() {
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
