package chart

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	monv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/promql/promqltest"
	"github.com/prometheus/prometheus/storage"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kvferry/kvferry/pkg/metrics"
)

// alertRule is one rendered alert.
type alertRule struct {
	name, expr string
	hold       time.Duration // the rule's for:
}

func monitoringKit(t *testing.T) ([]alertRule, []string) {
	t.Helper()
	r := render(t, filepath.Join(chartDir(t), "ci", "mtls-netpol-values.yaml"))
	var rules []alertRule
	for _, pr := range objectsOf[*monv1.PrometheusRule](r) {
		for _, g := range pr.Spec.Groups {
			for _, rule := range g.Rules {
				var hold time.Duration
				if rule.For != nil {
					d, err := model.ParseDuration(string(*rule.For))
					if err != nil {
						t.Fatalf("%s: for: %v", rule.Alert, err)
					}
					hold = time.Duration(d)
				}
				rules = append(rules, alertRule{name: rule.Alert, expr: rule.Expr.String(), hold: hold})
			}
		}
	}
	var panels []string
	for _, cm := range objectsOf[*corev1.ConfigMap](r) {
		js, ok := cm.Data["kvferry.json"]
		if !ok {
			continue
		}
		var dash struct {
			Panels []struct {
				Title   string `json:"title"`
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
			} `json:"panels"`
		}
		if err := json.Unmarshal([]byte(js), &dash); err != nil {
			t.Fatalf("dashboard JSON: %v", err)
		}
		for _, p := range dash.Panels {
			for _, tg := range p.Targets {
				panels = append(panels, tg.Expr)
			}
		}
	}
	if len(rules) < 8 || len(panels) < 20 {
		t.Fatalf("%d alerts, %d dashboard queries", len(rules), len(panels))
	}
	return rules, panels
}

// grafanaVars are the dashboard's Grafana variables, as Grafana
// substitutes them before a query reaches Prometheus.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m")

// adapterRule is one prometheus-adapter rule of
// files/prometheus-adapter-rules.yaml.
type adapterRule struct {
	SeriesQuery string `json:"seriesQuery"`
	Resources   struct {
		Overrides map[string]struct {
			Resource string `json:"resource"`
		} `json:"overrides"`
	} `json:"resources"`
	Name struct {
		As string `json:"as"`
	} `json:"name"`
	MetricsQuery string `json:"metricsQuery"`
}

func adapterRules(t *testing.T) []adapterRule {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartDir(t), "files", "prometheus-adapter-rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rules []adapterRule
	if err := yaml.UnmarshalStrict(b, &rules); err != nil {
		t.Fatalf("prometheus-adapter rules: %v", err)
	}
	if len(rules) == 0 {
		t.Fatal("no prometheus-adapter rules")
	}
	return rules
}

// adapterVars are prometheus-adapter's template variables, as it fills
// them for one pod's query.
var adapterVars = strings.NewReplacer("<<.LabelMatchers>>", `namespace="serving",pod="p-0"`, "<<.GroupBy>>", "pod")

// TestPromQLNamesExportedFamilies: every alert, dashboard and autoscaling
// (prometheus-adapter) query parses,
// and every metric it reads is one a kvferry process exports (checked
// against the families the binaries' constructors register).
func TestPromQLNamesExportedFamilies(t *testing.T) {
	rules, panels := monitoringKit(t)
	families := metrics.FamilyNames()
	known := func(name string) bool {
		if slices.Contains(families, name) {
			return true
		}
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && slices.Contains(families, base) {
				return true
			}
		}
		return false
	}
	exprs := append([]string{}, panels...)
	for _, r := range rules {
		exprs = append(exprs, r.expr)
	}
	for _, r := range adapterRules(t) {
		exprs = append(exprs, adapterVars.Replace(r.MetricsQuery))
	}
	p := parser.NewParser(parser.Options{})
	read := 0
	for _, e := range exprs {
		ast, err := p.ParseExpr(grafanaVars.Replace(e))
		if err != nil {
			t.Errorf("does not parse: %v\n%s", err, e)
			continue
		}
		parser.Inspect(ast, func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok {
				read++
				if !known(vs.Name) {
					t.Errorf("reads %q, which no kvferry process exports:\n%s", vs.Name, e)
				}
			}
			return nil
		})
	}
	if read < len(exprs) {
		t.Fatalf("%d selectors in %d queries", read, len(exprs))
	}
}

// alertCase is sample series (a promqltest load block at 1m steps, 30
// minutes) on which an alert must fire or stay silent.
type alertCase struct {
	series string
	fires  bool
}

const ns = `namespace="serving"`

// alertCases: for each alert, series that must fire it and series that
// must not. An alert without both fails TestAlertRules.
var alertCases = map[string][]alertCase{
	"KvferryPodWedged": {
		{`kvferry_health_live{` + ns + `,pod="g1",component="genserver"} 1x5 0x25
		  kvferry_scheduler_running_sequences{` + ns + `,pod="g1",component="genserver"} 3x30`, true},
		{`kvferry_health_live{` + ns + `,pod="g1",component="genserver"} 1x5 0x25
		  kvferry_scheduler_running_sequences{` + ns + `,pod="g1",component="genserver"} 0x30
		  kvferry_scheduler_waiting_requests{` + ns + `,pod="g1",component="genserver"} 0x30
		  kvferry_blockpool_blocks{` + ns + `,pod="g1",component="genserver",state="in_flight"} 0x30`, false},
		// Work pending on another pod does not make this one wedged.
		{`kvferry_health_live{` + ns + `,pod="g1",component="genserver"} 0x30
		  kvferry_scheduler_running_sequences{` + ns + `,pod="g2",component="genserver"} 3x30`, false},
	},
	"KvferryPoisonBudgetApproaching": {
		{`kvferry_blockpool_blocks{` + ns + `,pod="c1",component="ctxserver",state="poisoned"} 14x30
		  kvferry_health_poison_budget_blocks{` + ns + `,pod="c1",component="ctxserver"} 16x30`, true},
		{`kvferry_blockpool_blocks{` + ns + `,pod="c1",component="ctxserver",state="poisoned"} 4x30
		  kvferry_health_poison_budget_blocks{` + ns + `,pod="c1",component="ctxserver"} 16x30`, false},
	},
	"KvferryQuarantineGrowing": {
		{`kvferry_blockpool_blocks{` + ns + `,pod="c1",component="ctxserver",state="quarantined"} 0+1x30`, true},
		{`kvferry_blockpool_blocks{` + ns + `,pod="c1",component="ctxserver",state="quarantined"} 5x30`, false},
	},
	"KvferryCanaryFailing": {
		{`kvferry_health_canary_total{` + ns + `,pod="g1",component="genserver",result="failed"} 0+1x30
		  kvferry_health_canary_total{` + ns + `,pod="g1",component="genserver",result="ok"} 0x30`, true},
		{`kvferry_health_canary_total{` + ns + `,pod="g1",component="genserver",result="failed"} 0+1x30
		  kvferry_health_canary_total{` + ns + `,pod="g1",component="genserver",result="ok"} 0+1x30`, false},
	},
	"KvferryNoReadyContextServer": {
		{`kvferry_health_ready{` + ns + `,pod="c1",component="ctxserver"} 1x5 0x25
		  kvferry_health_ready{` + ns + `,pod="g1",component="genserver"} 1x30`, true},
		{`kvferry_health_ready{` + ns + `,pod="c1",component="ctxserver"} 0x30
		  kvferry_health_ready{` + ns + `,pod="c2",component="ctxserver"} 1x30`, false},
	},
	"KvferryNoReadyGenerationServer": {
		{`kvferry_health_ready{` + ns + `,pod="c1",component="ctxserver"} 1x30`, true},
		{`kvferry_health_ready{` + ns + `,pod="g1",component="genserver"} 1x30`, false},
	},
	"KvferryCancelToFreeSlow": {
		{`kvferry_cancel_to_free_seconds_bucket{` + ns + `,pod="g1",component="genserver",le="1"} 0x30
		  kvferry_cancel_to_free_seconds_bucket{` + ns + `,pod="g1",component="genserver",le="10"} 0+10x30
		  kvferry_cancel_to_free_seconds_bucket{` + ns + `,pod="g1",component="genserver",le="+Inf"} 0+10x30`, true},
		{`kvferry_cancel_to_free_seconds_bucket{` + ns + `,pod="g1",component="genserver",le="1"} 0+10x30
		  kvferry_cancel_to_free_seconds_bucket{` + ns + `,pod="g1",component="genserver",le="10"} 0+10x30
		  kvferry_cancel_to_free_seconds_bucket{` + ns + `,pod="g1",component="genserver",le="+Inf"} 0+10x30`, false},
	},
	"KvferryQueueWaitHigh": {
		{`kvferry_scheduler_queue_seconds_bucket{` + ns + `,pod="c1",component="ctxserver",le="5"} 0x30
		  kvferry_scheduler_queue_seconds_bucket{` + ns + `,pod="c1",component="ctxserver",le="60"} 0+4x30
		  kvferry_scheduler_queue_seconds_bucket{` + ns + `,pod="c1",component="ctxserver",le="+Inf"} 0+4x30`, true},
		{`kvferry_scheduler_queue_seconds_bucket{` + ns + `,pod="c1",component="ctxserver",le="5"} 0+4x30
		  kvferry_scheduler_queue_seconds_bucket{` + ns + `,pod="c1",component="ctxserver",le="60"} 0+4x30
		  kvferry_scheduler_queue_seconds_bucket{` + ns + `,pod="c1",component="ctxserver",le="+Inf"} 0+4x30`, false},
	},
	"KvferryRejectingRequests": {
		{`kvferry_router_requests_total{` + ns + `,pod="r1",component="router",outcome="ok"} 0+10x30
		  kvferry_router_requests_total{` + ns + `,pod="r1",component="router",outcome="rejected"} 0+2x30`, true},
		{`kvferry_router_requests_total{` + ns + `,pod="r1",component="router",outcome="ok"} 0+100x30
		  kvferry_router_requests_total{` + ns + `,pod="r1",component="router",outcome="rejected"} 0+1x30`, false},
	},
}

// TestAlertRules runs every rendered alert on its sample series: it must
// fire (its expression true at every minute of its for: window, as
// Prometheus evaluates it) on the first and stay silent on the others.
func TestAlertRules(t *testing.T) {
	rules, _ := monitoringKit(t)
	eng := promqltest.NewTestEngine(t, false, 5*time.Minute, 1e6)
	for _, r := range rules {
		cases := alertCases[r.name]
		if !slices.ContainsFunc(cases, func(c alertCase) bool { return c.fires }) || !slices.ContainsFunc(cases, func(c alertCase) bool { return !c.fires }) {
			t.Errorf("%s: no sample series that fire it and that do not", r.name)
			continue
		}
		for i, c := range cases {
			st := promqltest.LoadedStorage(t, "load 1m\n"+c.series)
			if got := fires(t, eng, st, r); got != c.fires {
				t.Errorf("%s, case %d: fired %v, want %v\nexpr: %s", r.name, i, got, c.fires, r.expr)
			}
			_ = st.Close()
		}
	}
}

// fires evaluates the rule every minute over the 30 loaded minutes and
// reports whether it held for a whole for: window.
func fires(t *testing.T, eng *promql.Engine, st storage.Queryable, r alertRule) bool {
	t.Helper()
	held := time.Duration(-1)
	for m := 0; m <= 30; m++ {
		at := time.Unix(0, 0).Add(time.Duration(m) * time.Minute)
		q, err := eng.NewInstantQuery(context.Background(), st, nil, r.expr, at)
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		res := q.Exec(context.Background())
		if res.Err != nil {
			t.Fatalf("%s at %dm: %v", r.name, m, res.Err)
		}
		v, err := res.Vector()
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		q.Close()
		if len(v) == 0 {
			held = -1
			continue
		}
		if held < 0 {
			held = 0
		} else {
			held += time.Minute
		}
		if held >= r.hold {
			return true
		}
	}
	return false
}
