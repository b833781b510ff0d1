package kvtransfer

import (
	"testing"
	"time"
)

var testTimeouts = Timeouts{Progress: 10 * time.Second, Deadline: 60 * time.Second, Quarantine: 120 * time.Second}

func TestSessionTransitions(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	type step struct {
		do   func(*Session) Actions
		want Actions
	}
	for _, tc := range []struct {
		name    string
		steps   []step
		outcome Outcome
		disp    Disposition
	}{
		{
			name:    "cancel while queued ends quiesced, no quarantine",
			steps:   []step{{func(s *Session) Actions { return s.Cancel(at(0)) }, ActNotify | ActUnpin}},
			outcome: OutcomeCancelled, disp: DispQuiesced,
		},
		{
			name: "a queued transfer never times out",
			steps: []step{
				{func(s *Session) Actions { return s.Tick(at(time.Hour)) }, 0},
				{func(s *Session) Actions { return s.Start(at(time.Hour)) }, 0},
				{func(s *Session) Actions { return s.Tick(at(time.Hour + 5*time.Second)) }, 0},
			},
			outcome: OutcomeNone, disp: DispActive,
		},
		{
			name: "completion",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Progress(at(time.Second), 4096) }, 0},
				{func(s *Session) Actions { return s.Complete(at(2 * time.Second)) }, ActNotify | ActUnpin},
				{func(s *Session) Actions { return s.Cancel(at(3 * time.Second)) }, 0},
			},
			outcome: OutcomeCompleted, disp: DispQuiesced,
		},
		{
			name: "cancel after ready quarantines and asks for an abort; the ack returns the blocks",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Cancel(at(time.Second)) }, ActNotify | ActAbort | ActQuarantine},
				{func(s *Session) Actions { return s.Cancel(at(2 * time.Second)) }, 0},
				{func(s *Session) Actions { return s.Prove(at(3*time.Second), ProofAbortAck) }, ActUnquarantine},
				{func(s *Session) Actions { return s.Prove(at(4*time.Second), ProofTransportTerminal) }, 0},
			},
			outcome: OutcomeCancelled, disp: DispQuiesced,
		},
		{
			name: "no progress times out; a slow but moving transfer does not",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Progress(at(9*time.Second), 1) }, 0},
				{func(s *Session) Actions { return s.Tick(at(18 * time.Second)) }, 0},
				{func(s *Session) Actions { return s.Tick(at(19 * time.Second)) }, ActNotify | ActAbort | ActQuarantine},
			},
			outcome: OutcomeTimedOut, disp: DispInDoubt,
		},
		{
			name: "the deadline ends a moving transfer, anchored at start",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(30 * time.Second)) }, 0},
				{func(s *Session) Actions { return s.Progress(at(85*time.Second), 1) }, 0},
				{func(s *Session) Actions { return s.Tick(at(89 * time.Second)) }, 0},
				{func(s *Session) Actions { return s.Tick(at(90 * time.Second)) }, ActNotify | ActAbort | ActQuarantine},
			},
			outcome: OutcomeTimedOut, disp: DispInDoubt,
		},
		{
			name: "a timed-out transfer whose peer later finishes is proven quiet by it",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Tick(at(10 * time.Second)) }, ActNotify | ActAbort | ActQuarantine},
				{func(s *Session) Actions { return s.Complete(at(50 * time.Second)) }, ActUnquarantine},
			},
			outcome: OutcomeTimedOut, disp: DispQuiesced,
		},
		{
			name: "never proven quiet: poisoned at the quarantine deadline, not before",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Cancel(at(time.Second)) }, ActNotify | ActAbort | ActQuarantine},
				{func(s *Session) Actions { return s.Tick(at(120*time.Second + time.Second - 1)) }, 0},
				{func(s *Session) Actions { return s.Tick(at(121 * time.Second)) }, ActPoison},
				{func(s *Session) Actions { return s.Prove(at(122*time.Second), ProofPeerDead) }, 0},
			},
			outcome: OutcomeCancelled, disp: DispPoisoned,
		},
		{
			name: "a synchronous transport's return is outcome and proof at once",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Returned(at(time.Second), OutcomeTimedOut) }, ActNotify | ActUnpin},
				{func(s *Session) Actions { return s.Returned(at(2*time.Second), OutcomeCompleted) }, 0},
			},
			outcome: OutcomeTimedOut, disp: DispQuiesced,
		},
		{
			name: "a failure that proves the reader done ends quiesced",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Fail(at(time.Second), ProofTransportTerminal) }, ActNotify | ActUnpin},
			},
			outcome: OutcomeFailed, disp: DispQuiesced,
		},
		{
			name: "a failure without proof is in doubt",
			steps: []step{
				{func(s *Session) Actions { return s.Start(at(0)) }, 0},
				{func(s *Session) Actions { return s.Fail(at(time.Second), 0) }, ActNotify | ActAbort | ActQuarantine},
				{func(s *Session) Actions { return s.Fail(at(2*time.Second), ProofPeerDead) }, ActUnquarantine},
			},
			outcome: OutcomeFailed, disp: DispQuiesced,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewSession(testTimeouts)
			notified := 0
			for i, st := range tc.steps {
				got := st.do(s)
				if got != st.want {
					t.Fatalf("step %d: actions %08b, want %08b (%s)", i, got, st.want, s)
				}
				if got.Has(ActNotify) {
					notified++
				}
			}
			if s.Outcome() != tc.outcome || s.Disposition() != tc.disp {
				t.Fatalf("ended %s / %s, want %s / %s", s.Outcome(), s.Disposition(), tc.outcome, tc.disp)
			}
			if notified > 1 {
				t.Fatalf("outcome reported %d times", notified)
			}
		})
	}
}
