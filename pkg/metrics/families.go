package metrics

import (
	"regexp"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

// FamilyNames is every metric family a kvferry process can export — the
// router's and both servers' together, the Go and process collectors
// included — built by the same constructors the binaries call. A family
// of labelled series appears here before its first series does (a scrape
// would not show it yet), so dashboards and alerts can be checked against
// it: a query that names a family outside this list reads nothing, ever.
func FamilyNames() []string {
	reg := NewRegistry(false)
	RegisterPool(reg, emptyPool{})
	NewHealth(reg)
	NewQuarantine(reg)
	NewCanary(reg)
	NewScheduler(reg)
	NewGPU(reg)
	NewTransfer(reg)
	NewCancel(reg)
	NewRouter(reg)
	ch := make(chan *prometheus.Desc)
	go func() {
		reg.Describe(ch) // every registered collector's descriptors
		close(ch)
	}()
	var out []string
	for desc := range ch {
		if m := fqName.FindStringSubmatch(desc.String()); m != nil && !slices.Contains(out, m[1]) {
			out = append(out, m[1])
		}
	}
	slices.Sort(out)
	return out
}

// fqName finds a descriptor's name in its String form (Desc has no getter).
var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

// emptyPool stands in for a pool: only the descriptors are read.
type emptyPool struct{}

func (emptyPool) Capacity() int           { return 0 }
func (emptyPool) Cached() int             { return 0 }
func (emptyPool) ByState() map[string]int { return nil }
