// ucx_shim.h: the C side of the ucx transport (package kvtransfer, built
// with -tags ucx), included by each ucx_*.go file: the worker's state, the
// active-message handler and thin wrappers over UCP calls. Everything is
// static: each cgo file compiles its own copy.
#ifndef KVFERRY_UCX_SHIM_H
#define KVFERRY_UCX_SHIM_H
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
static inline ucs_status_t kvf_am_cb(void *arg, const void *header, size_t header_length,
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

static inline ucs_status_t kvf_init(kvf_state *s, int *efd) {
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
static inline void kvf_reap(kvf_state *s) {
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
static inline ucs_status_t kvf_am_send(kvf_state *s, ucp_ep_h ep, uint64_t id, const void *data, size_t len) {
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
static inline size_t kvf_destroy(kvf_state *s) {
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
static inline ucs_status_t kvf_ep_create(ucp_worker_h w, const void *addr, ucp_ep_h *ep) {
	ucp_ep_params_t p;
	memset(&p, 0, sizeof p);
	p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
	p.address = addr;
	return ucp_ep_create(w, &p, ep);
}

static inline ucs_status_ptr_t kvf_ep_close(ucp_ep_h ep) {
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
	p.flags = UCP_EP_CLOSE_FLAG_FORCE;
	return ucp_ep_close_nbx(ep, &p);
}

static inline ucs_status_ptr_t kvf_put(ucp_ep_h ep, const void *buf, size_t len, uint64_t raddr, ucp_rkey_h rkey) {
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	return ucp_put_nbx(ep, buf, len, raddr, rkey, &p);
}

static inline ucs_status_ptr_t kvf_flush(ucp_ep_h ep) {
	ucp_request_param_t p;
	memset(&p, 0, sizeof p);
	return ucp_ep_flush_nbx(ep, &p);
}

// kvf_ptr_status: UCS_OK when the operation completed at once, an error,
// or UCS_INPROGRESS when r is a request to poll.
static inline ucs_status_t kvf_ptr_status(ucs_status_ptr_t r) {
	if (r == NULL) {
		return UCS_OK;
	}
	if (UCS_PTR_IS_ERR(r)) {
		return UCS_PTR_STATUS(r);
	}
	return UCS_INPROGRESS;
}

// kvf_req_check returns a request's status, freeing it once complete.
static inline ucs_status_t kvf_req_check(void *r) {
	ucs_status_t st = ucp_request_check_status(r);
	if (st != UCS_INPROGRESS) {
		ucp_request_free(r);
	}
	return st;
}

// kvf_mem_alloc has UCX allocate and register len bytes, in the memory its
// transports reach fastest (shared memory a same-host peer can attach for
// posix), and returns where.
static inline ucs_status_t kvf_mem_alloc(ucp_context_h c, size_t len, ucp_mem_h *memh, void **addr) {
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

static inline kvf_state *kvf_new(void) { return calloc(1, sizeof(kvf_state)); }
static inline kvf_msg *kvf_msg_at(kvf_state *s, size_t i) { return &s->msgs[i]; }

#endif
