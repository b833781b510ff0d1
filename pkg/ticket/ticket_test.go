package ticket

import (
	"errors"
	"testing"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

func TestValidate(t *testing.T) {
	good := NewID()
	if good == NewID() {
		t.Fatal("two ids equal")
	}
	for _, tc := range []struct {
		name string
		t    *kvferryv1.Ticket
		ok   bool
	}{
		{"good", New(good), true},
		{"nil", nil, false},
		{"attempt 0", &kvferryv1.Ticket{RequestId: good}, false},
		{"short", &kvferryv1.Ticket{RequestId: "abc", Attempt: 1}, false},
		{"upper", &kvferryv1.Ticket{RequestId: "ABCDEF0123456789ABCDEF0123456789", Attempt: 1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Validate(tc.t)
			if (err == nil) != tc.ok {
				t.Fatalf("err %v, ok %v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("err %v not ErrInvalid", err)
			}
		})
	}
}
