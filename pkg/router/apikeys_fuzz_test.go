package router

import (
	"strings"
	"testing"
)

// FuzzBearer: any Authorization value is accepted exactly when it is
// "Bearer " and a configured key (surrounding spaces aside), and nothing
// panics; any client request id is accepted exactly when it is 1 to 128
// printable ASCII bytes.
func FuzzBearer(f *testing.F) {
	for _, s := range []string{"Bearer k1", "Bearer  k1 ", "bearer k1", "Bearer", "", "Bearer k2\x00", "k1"} {
		f.Add(s)
	}
	k := NewKeys([]Key{{Secret: "k1"}, {Secret: "another-key", Tenant: "acme"}})
	f.Fuzz(func(t *testing.T, header string) {
		key, ok := strings.CutPrefix(header, "Bearer ")
		key = strings.TrimSpace(key)
		want := ok && (key == "k1" || key == "another-key")
		if got := k.CheckBearer(header); got != want {
			t.Fatalf("CheckBearer(%q) = %v, want %v", header, got, want)
		}
		printable := len(header) > 0 && len(header) <= MaxClientIDBytes
		for i := 0; i < len(header); i++ {
			printable = printable && header[i] >= 0x20 && header[i] <= 0x7e
		}
		if got := ValidateClientID(header) == nil; got != printable {
			t.Fatalf("ValidateClientID(%q) accepted=%v, want %v", header, got, printable)
		}
	})
}
