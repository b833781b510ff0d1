package metrics

import (
	"bufio"
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/kvferry/kvferry/pkg/blockpool"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// contractRegistry registers every kvferry metric family.
func contractRegistry(t *testing.T) (*prometheus.Registry, *blockpool.Pool, *Transfer, *Cancel, *Router) {
	t.Helper()
	reg := NewRegistry(false)
	pool, _ := blockpool.New(10, 64)
	RegisterPool(reg, pool)
	NewHealth(reg)
	NewQuarantine(reg)
	NewCanary(reg)
	NewScheduler(reg)
	NewGPU(reg)
	return reg, pool, NewTransfer(reg), NewCancel(reg), NewRouter(reg)
}

// TestPromlint: the exposition passes Prometheus' own linter.
func TestPromlint(t *testing.T) {
	reg, _, _, _, _ := contractRegistry(t)
	problems, err := promlint.NewWithMetricFamilies(mustGather(t, reg)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "kvferry_") {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
	}
}

func mustGather(t *testing.T, reg *prometheus.Registry) []*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// TestHelpAndTypeGolden: the HELP and TYPE lines of every kvferry family
// are a contract (Health and metrics in the README); changing one must be deliberate (-update).
func TestHelpAndTypeGolden(t *testing.T) {
	reg, _, _, _, _ := contractRegistry(t)
	var buf bytes.Buffer
	for _, mf := range mustGather(t, reg) {
		if !strings.HasPrefix(mf.GetName(), "kvferry_") {
			continue
		}
		if _, err := expfmt.MetricFamilyToText(&buf, mf); err != nil {
			t.Fatal(err)
		}
	}
	var got strings.Builder
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "# HELP ") || strings.HasPrefix(line, "# TYPE ") {
			got.WriteString(line + "\n")
		}
	}
	golden := filepath.Join("testdata", "families.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(got.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got.String() != string(want) {
		t.Fatalf("families differ from %s (run go test -update if intended):\n%s", golden, got.String())
	}
}

func TestRecordersMove(t *testing.T) {
	reg, pool, tr, c, r := contractRegistry(t)
	ids, _ := pool.Allocate(t.Context(), 3)
	_ = pool.Pin(ids[:1])
	tr.RecordTransfer(SideReceiver, OutcomeCompleted, 4096, time.Millisecond)
	c.RecordOutcome("CANCEL_OUTCOME_ALREADY_COMPLETE")
	c.RecordCancelToFree(time.Millisecond)
	r.RecordRequest(RequestOK, time.Second)
	for _, tc := range []struct {
		c    prometheus.Collector
		want float64
	}{
		{tr.sessions.WithLabelValues(SideReceiver, OutcomeCompleted), 1},
		{tr.bytes.WithLabelValues(SideReceiver), 4096},
		{c.outcomes.WithLabelValues("already_complete"), 1},
		{r.requests.WithLabelValues(RequestOK), 1},
	} {
		if got := testutil.ToFloat64(tc.c); got != tc.want {
			t.Errorf("got %v, want %v", got, tc.want)
		}
	}
	want := `
# HELP kvferry_blockpool_blocks Number of KV blocks in each state; the states sum to the capacity.
# TYPE kvferry_blockpool_blocks gauge
kvferry_blockpool_blocks{state="free"} 7
kvferry_blockpool_blocks{state="in_flight"} 1
kvferry_blockpool_blocks{state="owned"} 2
kvferry_blockpool_blocks{state="poisoned"} 0
kvferry_blockpool_blocks{state="quarantined"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kvferry_blockpool_blocks"); err != nil {
		t.Fatal(err)
	}
}

// build_info says whether the process serves TLS.
func TestBuildInfoTLS(t *testing.T) {
	for _, tls := range []bool{false, true} {
		found := false
		for _, mf := range mustGather(t, NewRegistry(tls)) {
			if mf.GetName() != "kvferry_build_info" {
				continue
			}
			for _, l := range mf.GetMetric()[0].GetLabel() {
				if l.GetName() == "tls" {
					found = l.GetValue() == map[bool]string{false: "false", true: "true"}[tls]
				}
			}
		}
		if !found {
			t.Errorf("build_info lacks tls=%v", tls)
		}
	}
}

// TestFamilyNames: every constructor's families are listed, labelled ones
// before their first series, and the collectors' own.
func TestFamilyNames(t *testing.T) {
	names := FamilyNames()
	for _, want := range []string{"kvferry_gpu_memory_used_bytes", "kvferry_router_backend_inflight_requests", "kvferry_blockpool_blocks",
		"kvferry_cancel_to_free_seconds", "kvferry_health_poison_budget_blocks", "kvferry_build_info", "go_goroutines", "process_cpu_seconds_total"} {
		if !slices.Contains(names, want) {
			t.Errorf("FamilyNames lacks %s", want)
		}
	}
	reg, _, _, _, _ := contractRegistry(t)
	for _, mf := range mustGather(t, reg) {
		if !slices.Contains(names, mf.GetName()) {
			t.Errorf("FamilyNames lacks %s, which the contract registry exports", mf.GetName())
		}
	}
}
