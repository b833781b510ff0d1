package fault

import (
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	now := time.Unix(100, 0)
	for _, tc := range []struct {
		spec string
		want *Fault
		ok   bool
	}{
		{"", nil, true},
		{"stall", &Fault{Kind: KindStall, Rate: 1, Delay: 100 * time.Millisecond, start: now}, true},
		{"stall:after=2,for=5s", &Fault{Kind: KindStall, After: 2, For: 5 * time.Second, Rate: 1, Delay: 100 * time.Millisecond, start: now}, true},
		{"delay:delay=300ms,rate=0.5", &Fault{Kind: KindDelay, Rate: 0.5, Delay: 300 * time.Millisecond, start: now}, true},
		{"corrupt:after=1", &Fault{Kind: KindCorrupt, After: 1, Rate: 1, Delay: 100 * time.Millisecond, start: now}, true},
		{"melt", nil, false},
		{"stall:after=-1", nil, false},
		{"stall:rate=2", nil, false},
		{"stall:for", nil, false},
		{"stall:colour=red", nil, false},
	} {
		got, err := Parse(tc.spec, now)
		if (err == nil) != tc.ok {
			t.Fatalf("%q: err %v", tc.spec, err)
		}
		if tc.ok && (got == nil) != (tc.want == nil) || got != nil && tc.want != nil && *got != *tc.want {
			t.Fatalf("%q: got %+v, want %+v", tc.spec, got, tc.want)
		}
	}
}
