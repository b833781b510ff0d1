// Package ticket mints and checks request tickets: a 128-bit random request
// id (hex) and an attempt number starting at 1.
package ticket

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// ErrInvalid is returned for a malformed ticket.
var ErrInvalid = errors.New("invalid ticket")

// NewID returns a fresh 128-bit request id in hex.
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b[:])
}

// New returns the first attempt of a request.
func New(id string) *kvferryv1.Ticket { return &kvferryv1.Ticket{RequestId: id, Attempt: 1} }

// Validate checks a ticket from outside.
func Validate(t *kvferryv1.Ticket) error {
	if t == nil {
		return fmt.Errorf("%w: missing", ErrInvalid)
	}
	if err := ValidateID(t.GetRequestId()); err != nil {
		return err
	}
	if t.GetAttempt() == 0 {
		return fmt.Errorf("%w: attempt must be at least 1", ErrInvalid)
	}
	return nil
}

// ValidateID checks a request id: 32 lower-case hex digits.
func ValidateID(id string) error {
	if len(id) != 32 {
		return fmt.Errorf("%w: request_id must be 32 hex digits, got %d characters", ErrInvalid, len(id))
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("%w: request_id must be lower-case hex", ErrInvalid)
		}
	}
	return nil
}

// MaxTombstones bounds the ended requests a server remembers: past it the
// oldest are forgotten before their TTL, so a flood of short requests
// cannot grow a server's request table without bound.
const MaxTombstones = 65536

// Forget returns which tombstones (id → when the request ended) to drop
// now: every one older than ttl, then the oldest until at most max remain.
func Forget(ended map[string]time.Time, now time.Time, ttl time.Duration, max int) []string {
	var drop, keep []string
	for id, at := range ended {
		if now.Sub(at) > ttl {
			drop = append(drop, id)
		} else {
			keep = append(keep, id)
		}
	}
	if over := len(keep) - max; over > 0 {
		slices.SortFunc(keep, func(a, b string) int { return ended[a].Compare(ended[b]) })
		drop = append(drop, keep[:over]...)
	}
	return drop
}
