package genserver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/serving"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// receive is one request's KV receive, as the generation server runs it:
// the destination blocks pinned, the context server asked to push into
// them, then a wait for the data path's DONE notification, the sender's
// failure, cancellation, no progress for the progress timeout or the
// transfer deadline — the session decides which, and when the blocks may
// leave IN_FLIGHT. On every exit the receiver session is finished: its
// reader proves the blocks quiet, which returns quarantined ones.
//
// Its steps, in order: begin (pin, register), ask (the Transfer RPC up to
// READY), await (the select loop), then verify and decode on DONE; fail
// and finish end it on any other path.
type receive struct {
	s      *Server
	req    *kvferryv1.GenerateRequest
	tr     *transfer
	mem    [][]byte
	sid    kvtransfer.SessionID
	rs     *kvtransfer.RecvSession
	fields []zap.Field
	start  time.Time
	client kvferryv1.TransferServiceClient // set by ask

	finishOnce sync.Once
}

// Session events the receive uses without arguments.
func failNow(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions   { return ss.Fail(now, 0) }
func cancelNow(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Cancel(now) }

// failQuiet is a failure whose reader is already done with the blocks
// (a checksum mismatch after DONE): proven quiet at once.
func failQuiet(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions {
	return ss.Fail(now, kvtransfer.ProofTransportTerminal)
}

// receive runs a request's KV receive into blocks (mem their bytes) and
// returns the decode sequence built from them.
func (s *Server) receive(ctx context.Context, req *kvferryv1.GenerateRequest, r *request, blocks []blockpool.ID, mem [][]byte) ([]*executor.Sequence, error) {
	rc, err := s.beginReceive(req, r, blocks, mem)
	if err != nil {
		return nil, err
	}
	tracked := s.cfg.Sessions.Add(time.Now())
	defer s.cfg.Sessions.Remove(tracked)
	defer rc.finish() // before the session stops being tracked: a stuck proof shows
	if rc.rs, err = s.cfg.Receiver.Register(rc.sid, mem, func(now time.Time) {
		// Every landed block is progress, for this session and globally.
		s.cfg.Progress.Touch(now)
		s.cfg.Sessions.Touch(tracked, now)
	}); err != nil {
		rc.event(cancelNow)
		return nil, status.Errorf(codes.Internal, "register session: %v", err)
	}
	// The descriptors leave with the request: from now on the peer may write.
	rc.event(func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Start(now) })

	tctx, tcancel := context.WithCancel(serving.WithRequestID(ctx, req.GetTicket().GetRequestId()))
	var wg sync.WaitGroup
	defer wg.Wait()
	defer tcancel()
	tstream, err := rc.ask(ctx, tctx)
	if err != nil {
		return nil, err
	}
	// The sender's terminal event arrives on the stream; read it off the
	// handler's goroutine. Buffered by one so the reader never blocks; it
	// ends when the stream does (tcancel above), and wg waits for it.
	events := make(chan error, 1)
	wg.Go(func() {
		m, err := tstream.Recv()
		if err == nil && m.GetEvent() == kvferryv1.TransferEvent_TRANSFER_EVENT_FAILED {
			err = fmt.Errorf("sender failed: %s", m.GetReason())
		}
		events <- err
	})
	return rc.await(ctx, events)
}

// beginReceive pins the destination blocks for a new receive session.
func (s *Server) beginReceive(req *kvferryv1.GenerateRequest, r *request, blocks []blockpool.ID, mem [][]byte) (*receive, error) {
	id := req.GetTicket().GetRequestId()
	rc := &receive{s: s, req: req, mem: mem, start: time.Now(),
		tr:  &transfer{sess: kvtransfer.NewSession(s.cfg.Timeouts), hold: kvtransfer.Hold{Blocks: blocks}, r: r, requestID: id},
		sid: kvtransfer.NewSessionID(), // 128 random bits: the data port cannot be written by guessing
		fields: []zap.Field{zap.String("request_id", id), zap.Uint32("attempt", req.GetTicket().GetAttempt()),
			zap.String("peer", req.GetAdvertisement().GetTransferEndpoint())},
	}
	if err := rc.tr.hold.Pin(s.cfg.Pool); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.hold(r)
	return rc, nil
}

// event runs one session event under the server's lock.
func (rc *receive) event(ev func(*kvtransfer.Session, time.Time) kvtransfer.Actions) kvtransfer.Actions {
	return rc.s.step(rc.tr, ev)
}

// finish finishes the receiver session (its transport proves quiescence,
// which returns quarantined blocks) and records the outcome, once. A
// failure finishes it before asking the sender to stop, so that a sender
// slow to answer never delays the proof.
func (rc *receive) finish() {
	rc.finishOnce.Do(func() {
		s := rc.s
		if rc.rs == nil {
			return // never registered: nothing can land
		}
		s.cfg.Receiver.Finish(rc.rs, func() {
			rc.event(func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions {
				return ss.Prove(now, kvtransfer.ProofTransportTerminal)
			})
		})
		moved, _ := s.cfg.Receiver.Progress(rc.rs)
		s.mu.Lock()
		outcome := rc.tr.sess.Outcome()
		s.mu.Unlock()
		s.cfg.Transfers.RecordTransfer(metrics.SideReceiver, outcome.String(), moved, time.Since(rc.start))
		if outcome != kvtransfer.OutcomeCompleted {
			s.lg.Info("transfer ended", append(rc.fields, zap.String("outcome", outcome.String()), zap.Int64("bytes", moved))...)
		}
	})
}

// fail ends the session with ev, asks the sender to stop when the session
// says so, and returns cause.
func (rc *receive) fail(ctx context.Context, ev func(*kvtransfer.Session, time.Time) kvtransfer.Actions, cause error) ([]*executor.Sequence, error) {
	if as := rc.event(ev); as.Has(kvtransfer.ActAbort) && rc.client != nil {
		rc.finish()
		rc.s.abort(ctx, rc.client, rc.req.GetTicket(), rc.sid.ID)
	}
	return nil, cause
}

// unreachable is the error of a context server that could not be reached:
// its detail (the address, the dial error) is logged here and never sent
// to the caller, whose advertisement may have named any host.
func (rc *receive) unreachable(err error) error {
	rc.s.lg.Info("context server unreachable", zap.String("request_id", rc.req.GetTicket().GetRequestId()),
		zap.String("peer", rc.req.GetAdvertisement().GetTransferEndpoint()), zap.Error(err))
	return status.Error(codes.Unavailable, "transfer: the context server could not be reached")
}

// ask calls TransferService.Transfer on the advertising context server
// with the destination descriptors and waits for its READY.
func (rc *receive) ask(ctx, tctx context.Context) (kvferryv1.TransferService_TransferClient, error) {
	s, adv := rc.s, rc.req.GetAdvertisement()
	cc, err := s.cfg.Conns.Get(adv.GetTransferEndpoint())
	if err != nil {
		_, err = rc.fail(ctx, failNow, rc.unreachable(err))
		return nil, err
	}
	rc.client = kvferryv1.NewTransferServiceClient(cc)
	dests := make([]*kvferryv1.BlockDescriptor, len(rc.tr.hold.Blocks))
	for i, b := range rc.tr.hold.Blocks {
		dests[i] = &kvferryv1.BlockDescriptor{Index: uint32(b), Offset: s.cfg.Pool.Offset(b), Length: uint64(s.cfg.Pool.BlockSize())}
	}
	tstream, err := rc.client.Transfer(tctx, &kvferryv1.TransferRequest{
		Ticket: rc.req.GetTicket(), SessionId: rc.sid.ID, SessionKey: rc.sid.Key, ProtocolVersion: kvtransfer.ProtocolVersion,
		Layout: s.spec.Layout(), Transport: s.cfg.Transport, DataEndpoint: s.cfg.DataEndpoint, Destinations: dests,
	})
	if err != nil {
		_, err = rc.fail(ctx, failNow, rc.unreachable(err))
		return nil, err
	}
	first, err := tstream.Recv()
	if err == nil {
		// A context server answered for this ticket: a peer for the pair
		// canary. An endpoint that never answers is never probed (a forged
		// advertisement cannot make the canary redial it).
		s.canary.notePeer(adv.GetTransferEndpoint(), time.Now())
	}
	switch {
	case err != nil && ctx.Err() != nil:
		_, err = rc.fail(ctx, cancelNow, status.FromContextError(ctx.Err()).Err())
		return nil, err
	case err != nil && (status.Code(err) == codes.Unavailable || status.Code(err) == codes.Unknown):
		_, err = rc.fail(ctx, failNow, rc.unreachable(err))
		return nil, err
	case err != nil:
		_, err = rc.fail(ctx, failNow, status.Errorf(status.Code(err), "transfer: %v", status.Convert(err).Message()))
		return nil, err
	case first.GetEvent() != kvferryv1.TransferEvent_TRANSFER_EVENT_READY:
		// NOT_READY: the sender will not write; the receive blocks are
		// released normally once the reader confirms it.
		_, err = rc.fail(ctx, failNow, status.Errorf(codes.FailedPrecondition, "context server not ready: %s", first.GetReason()))
		return nil, err
	}
	return tstream, nil
}

// await waits for the data path's DONE (then verifies and decodes), the
// sender's terminal event, the caller leaving, or the session's timers.
func (rc *receive) await(ctx context.Context, events <-chan error) ([]*executor.Sequence, error) {
	s := rc.s
	tick := time.NewTicker(tickInterval(s.cfg.Timeouts))
	defer tick.Stop()
	var seen int64
	for {
		select {
		case <-rc.rs.Done():
			return rc.landed(ctx)
		case err := <-events:
			if err != nil {
				if ctx.Err() != nil {
					return rc.fail(ctx, cancelNow, status.FromContextError(ctx.Err()).Err())
				}
				return rc.fail(ctx, failNow, status.Errorf(codes.Unavailable, "transfer: %v", err))
			}
			events = nil // COMPLETED: the DONE frame follows on the data path
		case <-ctx.Done():
			return rc.fail(ctx, cancelNow, status.FromContextError(ctx.Err()).Err())
		case <-tick.C:
			moved, last := s.cfg.Receiver.Progress(rc.rs)
			delta := moved - seen
			seen = moved
			as := rc.event(func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions {
				ss.Progress(last, delta)
				return ss.Tick(now)
			})
			if as.Has(kvtransfer.ActNotify) {
				rc.finish()
				s.abort(ctx, rc.client, rc.req.GetTicket(), rc.sid.ID)
				return nil, status.Errorf(codes.DeadlineExceeded, "transfer timed out: no progress for %s or past the %s deadline", s.cfg.Timeouts.Progress, s.cfg.Timeouts.Deadline)
			}
		}
	}
}

// landed handles the data path's DONE: the receiver's verdict, then every
// block's checksum before the engine reads a byte of it, then the decode
// sequence.
func (rc *receive) landed(ctx context.Context) ([]*executor.Sequence, error) {
	s := rc.s
	if err := s.cfg.Receiver.Err(rc.rs); err != nil {
		code := codes.DataLoss
		if errors.Is(err, kvtransfer.ErrBadDescriptor) {
			code = codes.InvalidArgument // the peer named a block outside this session
		}
		return rc.fail(ctx, failNow, status.Errorf(code, "transfer: %v", err))
	}
	sums := executor.Checksums(rc.mem)
	for i, want := range rc.req.GetAdvertisement().GetBlockChecksums() {
		if sums[i] != want {
			return rc.fail(ctx, failQuiet, status.Errorf(codes.DataLoss, "block %d checksum %#x, advertised %#x", i, sums[i], want))
		}
	}
	rc.event(func(ss *kvtransfer.Session, now time.Time) kvtransfer.Actions { return ss.Complete(now) })
	s.cfg.Progress.Touch(time.Now())
	sampling, err := executor.ToSampling(rc.req.GetSampling())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error()) // validate checked it: not reached
	}
	firsts := append([]uint32{rc.req.GetFirstToken()}, rc.req.GetOtherFirstTokens()...)
	seqs, err := s.startChoices(ctx, rc.mem, sums, len(rc.req.GetPromptTokens()), firsts, sampling)
	if errors.Is(err, executor.ErrGrammar) {
		return nil, status.Errorf(codes.InvalidArgument, "first token: %v", err)
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return nil, status.Errorf(codes.Internal, "decode state: %v", err)
	}
	return seqs, nil
}
