// Package ticket mints and checks request tickets: a 128-bit random request
// id (hex) and an attempt number starting at 1.
package ticket

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

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
