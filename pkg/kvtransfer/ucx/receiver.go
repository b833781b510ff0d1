//go:build ucx

package ucx

/*
#cgo LDFLAGS: -lucp -lucs
#include "ucx_shim.h"
*/
import "C"

import (
	"unsafe"

	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// Listen starts a ucx receiver over size bytes of pool memory that UCX
// allocates and registers (shared memory a same-host writer attaches and
// copies into directly; elsewhere what the NIC can reach). It returns the
// memory, which lives until the receiver is closed: the pool must not be
// used after Close.
func Listen(size, maxBlock int, lg *zap.Logger) (*kvtransfer.Receiver, []byte, error) {
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

	endpoint := ucxRemote{addr: ad, rkey: rk, base: uint64(uintptr(unsafe.Pointer(&buf[0]))), size: uint64(len(buf)), id: w.id}.String()
	r := kvtransfer.NewReceiver(endpoint, maxBlock, lg, func() error { w.close(); return nil })
	// One link per writer (by its worker id), over an endpoint this
	// receiver made to the address of the writer's HELLO. Touched by the
	// pump only.
	type ucxLink struct {
		ep C.ucp_ep_h
		*kvtransfer.Link
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
			links[from] = &ucxLink{ep: ep, Link: kvtransfer.NewLink(w.signal)}
			return
		}
		l := links[from]
		if l == nil {
			lg.Warn("ucx frame from a writer that said no hello")
			return
		}
		h, err := kvtransfer.DecodeHeader(frame, r.MaxBlock())
		if err != nil {
			lg.Warn("bad ucx frame", zap.Error(err))
			return
		}
		q, ok := r.LinkFrame(l.Link, h)
		if !ok {
			lg.Warn("bad ucx frame", zap.Uint8("kind", uint8(h.Kind)))
		}
		if q != nil {
			q()
		}
	}
	w.before = func() {
		for _, l := range links {
			for _, h := range l.Take() {
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
	w.start()
	return r, buf, nil
}
