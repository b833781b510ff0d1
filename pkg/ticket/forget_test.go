package ticket

import (
	"slices"
	"testing"
	"time"
)

func TestForget(t *testing.T) {
	now := time.Unix(1000, 0)
	ended := map[string]time.Time{
		"expired": now.Add(-11 * time.Minute),
		"old":     now.Add(-5 * time.Minute),
		"mid":     now.Add(-3 * time.Minute),
		"new":     now.Add(-time.Minute),
	}
	got := Forget(ended, now, 10*time.Minute, 2)
	slices.Sort(got)
	if want := []string{"expired", "old"}; !slices.Equal(got, want) {
		t.Fatalf("forget %v, want %v", got, want)
	}
	if got := Forget(ended, now, 10*time.Minute, 10); !slices.Equal(got, []string{"expired"}) {
		t.Fatalf("under the cap: forget %v, want only the expired one", got)
	}
}
