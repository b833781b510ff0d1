/*
 * kvferry transfer lifecycle, model-checked with spin (make verify).
 *
 * Two receive sessions run one after the other on a pool of one
 * destination block, so the second is handed the block the first used.
 * The transport may deliver a posted write at any time until it is
 * terminal, lose the DONE notification, stall, and land a write late
 * after an abort (a stopped writer that wakes). The receiver may be
 * cancelled or time out at any moment. The map to the Go code is in
 * verify/README.md.
 *
 * Safety:   no write lands in a block that is FREE or held by another
 *           session (assert in transport);
 *           every session reaches exactly one logical outcome (assert).
 * Liveness: every session ends and the block leaves IN_FLIGHT
 *           (ltl terminates, under weak fairness: spin -a; pan -a -f).
 */

mtype = { FREE, OWNED, IN_FLIGHT, QUARANTINED, POISONED };   /* blockpool.State */
mtype = { NONE, COMPLETED, FAILED, CANCELLED, TIMED_OUT };  /* kvtransfer.Outcome */
mtype = { ACTIVE, QUIESCED, IN_DOUBT, DISP_POISONED };      /* kvtransfer.Disposition */

#define SESSIONS 2

mtype block = FREE;
byte  owner = 0;               /* session holding the block, 0 = none */
bool  refs = false;            /* the request's reference */

mtype outcome[SESSIONS + 1];
mtype disp[SESSIONS + 1];
byte  outcomes[SESSIONS + 1];  /* how many times an outcome was decided */
bool  ended[SESSIONS + 1];     /* session done and its block returned or poisoned */

/* each session's transport operation */
bool  posted[SESSIONS + 1];    /* a write is posted and may land */
bool  terminal[SESSIONS + 1];  /* the transport reports the operation terminal */
bool  notified[SESSIONS + 1];  /* DONE notification delivered */
bool  aborted[SESSIONS + 1];   /* abort requested */

inline decide(s, o, d) {
  atomic {
    assert(outcome[s] == NONE);
    outcome[s] = o; outcomes[s]++;
    disp[s] = d;
  }
}

/* DONE arrives or is lost, a write lands (possibly late), an abort takes
   effect: all at nondeterministic times. */
proctype Transport(byte s) {
  do
  :: posted[s] && !terminal[s] ->
       atomic {
         /* the write lands: the block must still be this session's, never
            FREE or another session's (a POISONED block is out of
            circulation for good, so a very late write there is harmless) */
         assert((block == IN_FLIGHT || block == QUARANTINED || block == POISONED) && owner == s);
         posted[s] = false;
         if
         :: !aborted[s] -> terminal[s] = true; notified[s] = true  /* DONE delivered */
         :: !aborted[s] -> terminal[s] = true                      /* DONE lost */
         :: aborted[s] -> terminal[s] = true                       /* late write, then the abort takes effect */
         fi
       }
  :: aborted[s] && !terminal[s] && !posted[s] -> terminal[s] = true /* abort takes effect */
  :: terminal[s] -> break
  od
}

proctype Receiver(byte s) {
  /* admission: the block must be FREE (the previous session returned it) */
  atomic { block == FREE -> block = OWNED; owner = s; refs = true }
  atomic { block = IN_FLIGHT; posted[s] = true; outcome[s] = NONE; disp[s] = ACTIVE }
  run Transport(s);
  if
  :: notified[s] -> decide(s, COMPLETED, QUIESCED)
  :: true -> decide(s, CANCELLED, IN_DOUBT); aborted[s] = true
  :: true -> decide(s, TIMED_OUT, IN_DOUBT); aborted[s] = true
  :: terminal[s] && !notified[s] -> decide(s, FAILED, QUIESCED)  /* a failure the transport reports terminal */
  fi;
  /* the request terminates: its reference goes (the one release path) */
  refs = false;
  if
  :: disp[s] == QUIESCED ->
       atomic { block = FREE; owner = 0 }                  /* unpin: nothing may touch it */
  :: disp[s] == IN_DOUBT ->
       block = QUARANTINED;
       if
       :: terminal[s] -> atomic { disp[s] = QUIESCED; block = FREE; owner = 0 }     /* reaper: proof */
       :: atomic { !terminal[s] -> disp[s] = DISP_POISONED; block = POISONED }      /* deadline, no proof */
       fi
  fi;
  assert(outcomes[s] == 1);
  ended[s] = true
}

init {
  atomic { run Receiver(1) };
  (ended[1]);
  if
  :: block != POISONED -> run Receiver(2); (ended[2])
  :: block == POISONED -> ended[2] = true   /* a poisoned block is never handed out again */
  fi
}

ltl terminates { <> (ended[1] && ended[2] && block != IN_FLIGHT) }
