package kvtransfer

import (
	"errors"
	"fmt"

	"github.com/kvferry/kvferry/pkg/blockpool"
)

// Hold is where a session's transfer pin on its blocks stands. Apply is the
// one place a session's actions become block-pool operations, for every
// owner (context server, generation server, simulation). The caller
// serialises access (its own lock).
type Hold struct {
	Blocks      []blockpool.ID
	Pinned      bool // IN_FLIGHT
	Quarantined bool
	Poisoned    bool
}

// Effects say what an Apply changed, for the owner's bookkeeping.
type Effects struct {
	// Released: the pin is gone (unpinned, or unquarantined on proof); the
	// blocks now follow their references alone.
	Released    bool
	Quarantined bool
	Poisoned    bool
}

// Pin pins the blocks for a transfer.
func (h *Hold) Pin(pool *blockpool.Pool) error {
	if err := pool.Pin(h.Blocks); err != nil {
		return fmt.Errorf("kvtransfer: pin: %w", err)
	}
	h.Pinned = true
	return nil
}

// Apply carries out the pool actions of as (quarantine, unpin,
// unquarantine, poison); notify and abort are the owner's.
func (h *Hold) Apply(pool *blockpool.Pool, as Actions) (Effects, error) {
	var eff Effects
	var errs []error
	if as.Has(ActQuarantine) && h.Pinned {
		errs = append(errs, pool.Quarantine(h.Blocks))
		h.Pinned, h.Quarantined, eff.Quarantined = false, true, true
	}
	if as.Has(ActUnpin) && h.Pinned {
		errs = append(errs, pool.Unpin(h.Blocks))
		h.Pinned, eff.Released = false, true
	}
	if as.Has(ActUnquarantine) && h.Quarantined {
		errs = append(errs, pool.Unquarantine(h.Blocks))
		h.Quarantined, eff.Released = false, true
	}
	if as.Has(ActPoison) && h.Quarantined {
		errs = append(errs, pool.Poison(h.Blocks))
		h.Quarantined, h.Poisoned, eff.Poisoned = false, true, true
	}
	return eff, errors.Join(errs...)
}
