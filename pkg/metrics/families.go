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
	rec := &describer{Registerer: reg, names: map[string]bool{}}
	RegisterPool(rec, emptyPool{})
	NewHealth(rec)
	NewQuarantine(rec)
	NewCanary(rec)
	NewScheduler(rec)
	NewGPU(rec)
	NewTransfer(rec)
	NewCancel(rec)
	NewRouter(rec)
	if mfs, err := reg.Gather(); err == nil {
		for _, mf := range mfs {
			rec.names[mf.GetName()] = true
		}
	}
	out := make([]string, 0, len(rec.names))
	for n := range rec.names {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// describer registers through to a registry and records the name of every
// descriptor it is shown.
type describer struct {
	prometheus.Registerer
	names map[string]bool
}

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (d *describer) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc)
	go func() {
		c.Describe(ch)
		close(ch)
	}()
	for desc := range ch {
		if m := fqName.FindStringSubmatch(desc.String()); m != nil {
			d.names[m[1]] = true
		}
	}
	return d.Registerer.Register(c)
}

func (d *describer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := d.Register(c); err != nil {
			panic(err)
		}
	}
}

// emptyPool stands in for a pool: only the descriptors are read.
type emptyPool struct{}

func (emptyPool) Capacity() int           { return 0 }
func (emptyPool) Cached() int             { return 0 }
func (emptyPool) ByState() map[string]int { return nil }
