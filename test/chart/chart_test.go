// Package chart checks the Helm chart in deploy/helm/kvferry without a
// cluster: it renders the chart with Helm's Go SDK for every values file in
// its ci/ folder, decodes every object strictly (client-go's scheme, the
// prometheus-operator and cert-manager types: an unknown field or a wrong
// type fails), checks that every flag and KVFERRY_ variable a container
// sets exists on the binary it runs, parses every PromQL expression of the
// alerts and the dashboard, checks that each names only metric families a
// kvferry process exports, and runs the alerts against sample series.
package chart

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	cmv1 "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	monv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"github.com/kvferry/kvferry/test/stack"
)

const (
	releaseName = "kvferry"
	namespace   = "serving"
)

var binDir string

func TestMain(m *testing.M) { os.Exit(stack.RunWithBinaries(m, false, &binDir)) }

// rendered is one values file's manifests, decoded.
type rendered struct {
	values  string
	objects []runtime.Object
}

func chartDir(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "..", "deploy", "helm", "kvferry"))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// decoder decodes strictly: unknown fields, duplicate fields and wrong
// types are errors.
func decoder(t testing.TB) runtime.Decoder {
	t.Helper()
	sch := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{scheme.AddToScheme, monv1.AddToScheme, cmv1.AddToScheme} {
		if err := add(sch); err != nil {
			t.Fatal(err)
		}
	}
	return serializer.NewCodecFactory(sch, serializer.EnableStrict).UniversalDeserializer()
}

// render renders the chart with one values file, as helm install would
// into namespace, and decodes every object.
func render(t testing.TB, valuesFile string) rendered {
	t.Helper()
	vals, err := chartutil.ReadValuesFile(valuesFile)
	if err != nil {
		t.Fatal(err)
	}
	files, err := renderValues(t, vals)
	if err != nil {
		t.Fatalf("%s: %v", filepath.Base(valuesFile), err)
	}
	dec := decoder(t)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	out := rendered{values: filepath.Base(valuesFile)}
	for _, name := range names {
		if !strings.HasSuffix(name, ".yaml") {
			continue // NOTES.txt, helpers
		}
		for i, doc := range strings.Split(files[name], "\n---") {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			js, err := yaml.YAMLToJSONStrict([]byte(doc))
			if err != nil {
				t.Fatalf("%s: %s document %d is not YAML: %v\n%s", out.values, name, i, err, doc)
			}
			obj, _, err := dec.Decode(js, nil, nil)
			if err != nil {
				t.Fatalf("%s: %s document %d: %v\n%s", out.values, name, i, err, doc)
			}
			out.objects = append(out.objects, obj)
		}
	}
	return out
}

// renderValues renders the chart's files with vals as helm install would.
func renderValues(t testing.TB, vals chartutil.Values) (map[string]string, error) {
	t.Helper()
	ch, err := loader.Load(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	caps.KubeVersion = chartutil.KubeVersion{Version: "v1.31.0", Major: "1", Minor: "31"}
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: releaseName, Namespace: namespace, IsInstall: true, Revision: 1}, caps)
	if err != nil {
		return nil, err // the values schema refused them
	}
	return engine.Render(ch, rv)
}

// TestClosedByDefault: the chart's own defaults do not render an open
// router (no API keys) or an unpinned image; the operator says so on
// purpose (auth.insecure) or names the Secret.
func TestClosedByDefault(t *testing.T) {
	for _, tc := range []struct{ values, want string }{
		{"{}", "auth.apiKeysSecret"},
		{"transport: shm", "auth.apiKeysSecret"},
		{"auth: {apiKeysSecret: k}\nimage: {tag: latest}", "/image/tag"},
	} {
		vals, err := chartutil.ReadValues([]byte(tc.values))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := renderValues(t, vals); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q renders: %v, want a failure naming %s", tc.values, err, tc.want)
		}
	}
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func valuesFiles(t testing.TB) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(chartDir(t), "ci", "*-values.yaml"))
	if err != nil || len(files) < 4 {
		t.Fatalf("values files in ci/: %v, %v", files, err)
	}
	return files
}

func renderAll(t *testing.T) []rendered {
	t.Helper()
	var out []rendered
	for _, f := range valuesFiles(t) {
		out = append(out, render(t, f))
	}
	return out
}

func objectsOf[T runtime.Object](r rendered) []T {
	var out []T
	for _, o := range r.objects {
		if v, ok := o.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

func deployment(t *testing.T, r rendered, suffix string) *appsv1.Deployment {
	t.Helper()
	for _, d := range objectsOf[*appsv1.Deployment](r) {
		if d.Name == releaseName+"-"+suffix {
			return d
		}
	}
	t.Fatalf("%s: no Deployment %s-%s", r.values, releaseName, suffix)
	return nil
}

// TestHelmLint: helm lint's own rules (Chart.yaml, values, templates,
// Kubernetes names and API versions) pass for every values file, warnings
// included; infos (the missing icon) are logged.
func TestHelmLint(t *testing.T) {
	for _, f := range valuesFiles(t) {
		vals, err := chartutil.ReadValuesFile(f)
		if err != nil {
			t.Fatal(err)
		}
		kv := chartutil.KubeVersion{Version: "v1.31.0", Major: "1", Minor: "31"}
		for _, m := range lint.AllWithKubeVersion(chartDir(t), vals, namespace, &kv).Messages {
			if m.Severity >= support.WarningSev {
				t.Errorf("%s: %s", filepath.Base(f), m)
			} else {
				t.Logf("%s: %s", filepath.Base(f), m)
			}
		}
	}
}

// TestValuesSchema: values.schema.json refuses what helm install would
// refuse — a misspelt key, a wrong type, a transport or engine that does
// not exist — and takes every values file in ci/.
func TestValuesSchema(t *testing.T) {
	ch, err := loader.Load(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	check := func(user string) error {
		vals, err := chartutil.ReadValues([]byte(user))
		if err != nil {
			t.Fatal(err)
		}
		merged, err := chartutil.CoalesceValues(ch, vals)
		if err != nil {
			t.Fatal(err)
		}
		return chartutil.ValidateAgainstSchema(ch, merged)
	}
	for _, f := range valuesFiles(t) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := check(string(b)); err != nil {
			t.Errorf("%s: %v", filepath.Base(f), err)
		}
	}
	for _, bad := range []string{"ctxsever: {replicas: 3}", "transport: rdma", "model: {engine: vllm}", "genserver: {replicas: many}",
		"health: {shutdownGrace: 1m}", "model: {sha256: abc}", "image: {tag: latest}", "image: {digest: latest}", "router: {apiKeysSecret: k}", "router: {extraArgs: [max-inflight=3]}"} {
		if err := check(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

// TestRenderAndShape: each values file renders to strictly valid objects
// of the shape it asks for.
func TestRenderAndShape(t *testing.T) {
	for _, r := range renderAll(t) {
		kinds := map[string]int{}
		for _, o := range r.objects {
			kinds[fmt.Sprintf("%T", o)]++
		}
		t.Logf("%s: %v", r.values, kinds)
		switch r.values {
		case "default-values.yaml":
			if n := *deployment(t, r, "router").Spec.Replicas; n != 2 {
				t.Errorf("default: %d routers", n)
			}
			// Closed by default: mTLS certificates per role, network
			// policies, API keys, a pinned image.
			if kinds["*v1.PodDisruptionBudget"] != 3 || kinds["*v1.Role"] != 1 || kinds["*v1.Certificate"] != 3 || kinds["*v1.NetworkPolicy"] != 3 {
				t.Errorf("default: kinds %v", kinds)
			}
			rc := deployment(t, r, "router").Spec.Template.Spec.Containers[0]
			if !slices.Contains(rc.Args, "--api-keys-file=/etc/kvferry/api-keys/keys") || !slices.Contains(rc.Args, "--tls-ca=/etc/kvferry/tls/ca.crt") {
				t.Errorf("default: router args %v, want API keys and mTLS", rc.Args)
			}
			if rc.Image != "kvferry:0.1.0" {
				t.Errorf("default: image %q", rc.Image)
			}
		case "shm-pair-values.yaml":
			d := deployment(t, r, "pair")
			var names []string
			for _, c := range d.Spec.Template.Spec.Containers {
				names = append(names, c.Name)
			}
			if !slices.Equal(names, []string{"router", "ctxserver", "genserver"}) || *d.Spec.Replicas != 2 {
				t.Errorf("shm pair: containers %v, replicas %d", names, *d.Spec.Replicas)
			}
			var shm *corev1.Volume
			for i, v := range d.Spec.Template.Spec.Volumes {
				if v.Name == "shm" {
					shm = &d.Spec.Template.Spec.Volumes[i]
				}
			}
			if shm == nil || shm.EmptyDir == nil || shm.EmptyDir.Medium != corev1.StorageMediumMemory {
				t.Errorf("shm pair: the shared volume is %+v, want an emptyDir of medium Memory", shm)
			}
			for _, c := range d.Spec.Template.Spec.Containers[1:] {
				if !slices.ContainsFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--grpc-addr=127.0.0.1:") }) {
					t.Errorf("shm pair: %s serves gRPC beyond loopback: %v", c.Name, c.Args)
				}
				if !slices.Contains(c.Args, "--transport=shm") || !slices.Contains(c.Args, "--shm-dir=/run/kvferry") {
					t.Errorf("shm pair: %s args %v", c.Name, c.Args)
				}
			}
		case "mtls-netpol-values.yaml":
			certs := objectsOf[*cmv1.Certificate](r)
			if len(certs) != 3 || kinds["*v1.NetworkPolicy"] != 3 || kinds["*v1.ServiceMonitor"] != 1 || kinds["*v1.PrometheusRule"] != 1 {
				t.Errorf("mtls: kinds %v", kinds)
			}
			for _, c := range certs {
				role := strings.TrimPrefix(c.Name, releaseName+"-")
				if !slices.Equal(c.Spec.URIs, []string{"spiffe://prod.example/kvferry/" + role}) {
					t.Errorf("certificate %s: URIs %v", c.Name, c.Spec.URIs)
				}
			}
			checkDataNames(t, r, certs)
			if img := deployment(t, r, "router").Spec.Template.Spec.Containers[0].Image; !strings.HasSuffix(img, "@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef") {
				t.Errorf("mtls: image %q is not pinned by its digest", img)
			}
		case "aggregated-values.yaml":
			checkAggregated(t, r, kinds)
		case "pairs-3x5-values.yaml":
			checkAutoscaling(t, r)
		default:
			t.Errorf("no shape check for %s", r.values)
		}
		for _, d := range objectsOf[*appsv1.Deployment](r) {
			checkPod(t, r.values, d)
		}
		checkPortNames(t, r)
	}
}

// checkPortNames: every named port a probe, a Service or a NetworkPolicy
// refers to is a port of a container in the pods it selects (strict
// decoding cannot see this; a cluster would, at 3 am).
func checkPortNames(t *testing.T, r rendered) {
	t.Helper()
	type pod struct {
		labels map[string]string
		ports  map[string]bool
	}
	var pods []pod
	for _, d := range objectsOf[*appsv1.Deployment](r) {
		p := pod{labels: d.Spec.Template.Labels, ports: map[string]bool{}}
		for _, c := range d.Spec.Template.Spec.Containers {
			for _, cp := range c.Ports {
				p.ports[cp.Name] = true
			}
		}
		for _, c := range d.Spec.Template.Spec.Containers {
			for _, pr := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
				if pr != nil && pr.HTTPGet != nil && !p.ports[pr.HTTPGet.Port.String()] {
					t.Errorf("%s: %s/%s probes port %q it does not have", r.values, d.Name, c.Name, pr.HTTPGet.Port.String())
				}
			}
		}
		pods = append(pods, p)
	}
	selected := func(sel map[string]string) []pod {
		var out []pod
		for _, p := range pods {
			match := true
			for k, v := range sel {
				if p.labels[k] != v {
					match = false
				}
			}
			if match {
				out = append(out, p)
			}
		}
		return out
	}
	for _, svc := range objectsOf[*corev1.Service](r) {
		ps := selected(svc.Spec.Selector)
		if len(ps) == 0 {
			t.Errorf("%s: Service %s selects no pod", r.values, svc.Name)
		}
		for _, sp := range svc.Spec.Ports {
			for _, p := range ps {
				if name := sp.TargetPort.String(); sp.TargetPort.Type == intstr.String && !p.ports[name] {
					t.Errorf("%s: Service %s targets port %q its pods do not have", r.values, svc.Name, name)
				}
			}
		}
	}
	for _, np := range objectsOf[*networkingv1.NetworkPolicy](r) {
		ps := selected(np.Spec.PodSelector.MatchLabels)
		if len(ps) == 0 {
			t.Errorf("%s: NetworkPolicy %s selects no pod", r.values, np.Name)
		}
		for _, rule := range np.Spec.Ingress {
			for _, port := range rule.Ports {
				for _, p := range ps {
					if port.Port != nil && port.Port.Type == intstr.String && !p.ports[port.Port.String()] {
						t.Errorf("%s: NetworkPolicy %s names port %q its pods do not have", r.values, np.Name, port.Port.String())
					}
				}
			}
			for _, peer := range rule.From {
				if peer.PodSelector != nil && len(selected(peer.PodSelector.MatchLabels)) == 0 {
					t.Errorf("%s: NetworkPolicy %s admits pods %v, which no Deployment makes", r.values, np.Name, peer.PodSelector.MatchLabels)
				}
			}
		}
	}
}

// checkAutoscaling: context and generation servers each have a
// HorizontalPodAutoscaler of their own (3 to 6, 5 to 20) on the two
// custom metrics the prometheus-adapter rules serve, and their
// Deployments leave replicas to it.
func checkAutoscaling(t *testing.T, r rendered) {
	t.Helper()
	served := map[string]bool{}
	for _, rule := range adapterRules(t) {
		served[rule.Name.As] = true
	}
	hpas := map[string]*autoscalingv2.HorizontalPodAutoscaler{}
	for _, h := range objectsOf[*autoscalingv2.HorizontalPodAutoscaler](r) {
		hpas[h.Spec.ScaleTargetRef.Name] = h
	}
	for _, c := range []struct {
		suffix   string
		min, max int32
	}{{"ctx", 3, 6}, {"gen", 5, 20}} {
		d := deployment(t, r, c.suffix)
		if d.Spec.Replicas != nil {
			t.Errorf("autoscaled %s sets replicas %d", d.Name, *d.Spec.Replicas)
		}
		h := hpas[d.Name]
		if h == nil || h.Spec.ScaleTargetRef.Kind != "Deployment" || *h.Spec.MinReplicas != c.min || h.Spec.MaxReplicas != c.max {
			t.Errorf("%s: autoscaler %+v, want %d to %d", d.Name, h, c.min, c.max)
			continue
		}
		if len(h.Spec.Metrics) != 2 {
			t.Errorf("%s: %d metrics", d.Name, len(h.Spec.Metrics))
		}
		for _, m := range h.Spec.Metrics {
			if m.Pods == nil || !served[m.Pods.Metric.Name] {
				t.Errorf("%s: metric %+v is not one the prometheus-adapter rules serve", d.Name, m)
			}
		}
	}
}

// checkDataNames: with mTLS the generation servers advertise their data
// endpoint under a Service that publishes not-ready pods (a server the
// canary marked unready must stay reachable by the canary that clears it),
// and their certificate's DNS SANs cover that name — else every context
// server would refuse to push to them.
func checkDataNames(t *testing.T, r rendered, certs []*cmv1.Certificate) {
	t.Helper()
	gen := deployment(t, r, "gen").Spec.Template.Spec.Containers[0]
	m := regexp.MustCompile(`--advertise-host=\\?"\$\(echo [^)]*\)\.([a-z0-9.-]+)\\?"`).FindStringSubmatch(strings.Join(gen.Command, " "))
	if m == nil {
		t.Fatalf("mtls: the generation server advertises no DNS name: %q", gen.Command)
	}
	suffix := m[1] // SERVICE.NS.svc.DOMAIN
	svcName := strings.SplitN(suffix, ".", 2)[0]
	var svc *corev1.Service
	for _, s := range objectsOf[*corev1.Service](r) {
		if s.Name == svcName {
			svc = s
		}
	}
	if svc == nil || !svc.Spec.PublishNotReadyAddresses || svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("mtls: the advertised names' Service %s is %+v, want headless and publishing not-ready pods", svcName, svc)
	}
	if !strings.HasPrefix(suffix, svcName+"."+namespace+".svc.") {
		t.Errorf("mtls: advertised suffix %q is not under %s in %s", suffix, svcName, namespace)
	}
	for _, c := range certs {
		if strings.HasSuffix(c.Name, "-genserver") && !slices.Contains(c.Spec.DNSNames, "*."+suffix) {
			t.Errorf("mtls: genserver certificate names %v, not *.%s", c.Spec.DNSNames, suffix)
		}
	}
}

// checkPod: every container is probed on its admin port (startup probe
// for model load), runs as non-root, and the grace period outlasts the
// shutdown grace the container is given.
func checkPod(t *testing.T, values string, d *appsv1.Deployment) {
	t.Helper()
	spec := d.Spec.Template.Spec
	for _, c := range spec.Containers {
		if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/livez" ||
			c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" || c.StartupProbe == nil {
			t.Errorf("%s: %s/%s probes", values, d.Name, c.Name)
		}
		if c.SecurityContext == nil || c.SecurityContext.RunAsNonRoot == nil || !*c.SecurityContext.RunAsNonRoot {
			t.Errorf("%s: %s/%s may run as root", values, d.Name, c.Name)
		}
		for _, a := range c.Args {
			if g, ok := strings.CutPrefix(a, "--shutdown-grace="); ok {
				var secs int64
				if _, err := fmt.Sscanf(g, "%ds", &secs); err != nil {
					t.Fatalf("%s: %s: --shutdown-grace=%s", values, d.Name, g)
				}
				if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds <= secs {
					t.Errorf("%s: %s: grace period %v is not above --shutdown-grace=%s", values, d.Name, spec.TerminationGracePeriodSeconds, g)
				}
			}
		}
	}
}

var usageFlag = regexp.MustCompile(`(?m)^\s+--?([a-z0-9][a-z0-9-]*)`)

// binaryFlags runs a kvferry binary with -h and returns its flags.
func binaryFlags(t *testing.T, name string) map[string]bool {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(filepath.Join(binDir, name), "-h")
	cmd.Stdout, cmd.Stderr = &out, &out
	_ = cmd.Run() // -h exits non-zero after the usage
	flags := map[string]bool{}
	for _, m := range usageFlag.FindAllStringSubmatch(out.String(), -1) {
		flags[m[1]] = true
	}
	if len(flags) < 10 {
		t.Fatalf("%s -h listed %d flags:\n%s", name, len(flags), out.String())
	}
	return flags
}

var flagInShell = regexp.MustCompile(`--([a-z0-9-]+)=`)

// TestFlagsExist: every flag a container passes and every KVFERRY_
// variable it sets is one its binary has (a renamed flag fails here, not
// in a cluster at 3 am).
// checkAggregated: no context server anywhere — no Deployment, Service,
// certificate, disruption budget, network policy or alert names one — and
// the router and every generation server run with --aggregated.
func checkAggregated(t *testing.T, r rendered, kinds map[string]int) {
	t.Helper()
	for _, d := range objectsOf[*appsv1.Deployment](r) {
		if d.Name == releaseName+"-ctx" {
			t.Errorf("aggregated: a context server Deployment")
		}
	}
	for _, sv := range objectsOf[*corev1.Service](r) {
		if strings.Contains(sv.Name, "-ctx") {
			t.Errorf("aggregated: Service %s", sv.Name)
		}
	}
	if kinds["*v1.Certificate"] != 2 || kinds["*v1.PodDisruptionBudget"] != 2 || kinds["*v1.NetworkPolicy"] != 2 {
		t.Errorf("aggregated: kinds %v, want two of each role's objects (router, generation)", kinds)
	}
	gen := deployment(t, r, "gen")
	if *gen.Spec.Replicas != 4 || !slices.Contains(gen.Spec.Template.Spec.Containers[0].Args, "--aggregated") {
		t.Errorf("aggregated: generation servers %d, args %v", *gen.Spec.Replicas, gen.Spec.Template.Spec.Containers[0].Args)
	}
	rargs := deployment(t, r, "router").Spec.Template.Spec.Containers[0].Args
	if !slices.Contains(rargs, "--aggregated") || !slices.Contains(rargs, "--k8s-service=gen="+releaseName+"-gen") {
		t.Errorf("aggregated: router args %v", rargs)
	}
	for _, pr := range objectsOf[*monv1.PrometheusRule](r) {
		for _, g := range pr.Spec.Groups {
			for _, rule := range g.Rules {
				if strings.Contains(rule.Expr.String(), `component="ctxserver"`) {
					t.Errorf("aggregated: alert %s watches context servers, which do not exist", rule.Alert)
				}
			}
		}
	}
}

func TestFlagsExist(t *testing.T) {
	known := map[string]map[string]bool{}
	for _, b := range []string{"router", "ctxserver", "genserver"} {
		known[b] = binaryFlags(t, b)
	}
	checked := 0
	for _, r := range renderAll(t) {
		for _, d := range objectsOf[*appsv1.Deployment](r) {
			for _, c := range d.Spec.Template.Spec.Containers {
				bin := c.Name
				flags, ok := known[bin]
				if !ok {
					t.Fatalf("%s: container %s runs no kvferry binary", r.values, c.Name)
				}
				var names []string
				for _, a := range c.Args {
					if !strings.HasPrefix(a, "--") {
						t.Errorf("%s: %s: argument %q is not a flag", r.values, c.Name, a)
						continue
					}
					names = append(names, strings.SplitN(strings.TrimPrefix(a, "--"), "=", 2)[0])
				}
				if len(c.Command) > 0 && c.Command[0] == "/bin/sh" {
					for _, m := range flagInShell.FindAllStringSubmatch(strings.Join(c.Command, " "), -1) {
						names = append(names, m[1])
					}
				} else if len(c.Command) != 1 || c.Command[0] != "/usr/local/bin/"+bin {
					t.Errorf("%s: container %s runs %v", r.values, c.Name, c.Command)
				}
				for _, e := range c.Env {
					if n, ok := strings.CutPrefix(e.Name, "KVFERRY_"); ok {
						names = append(names, strings.ReplaceAll(strings.ToLower(n), "_", "-"))
					}
				}
				for _, n := range names {
					checked++
					if !flags[n] {
						t.Errorf("%s: %s sets --%s, which %s does not have", r.values, d.Name, n, bin)
					}
				}
			}
		}
	}
	if checked < 50 {
		t.Fatalf("only %d flags checked", checked)
	}
}

// TestDockerfile: the images the chart runs (cpu, the default, and cuda)
// hold the binaries where the chart's commands look, the llama.cpp
// libraries where the binaries' default --llama-lib-dir points, and run as
// the chart's non-root user.
func TestDockerfile(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	stages := map[string][]string{}
	var cur string
	for _, line := range strings.Split(string(src), "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[0] == "FROM" && strings.EqualFold(f[len(f)-2], "AS") {
			cur = f[len(f)-1]
			continue
		}
		if cur != "" && len(f) > 0 && !strings.HasPrefix(f[0], "#") {
			stages[cur] = append(stages[cur], strings.Join(f, " "))
		}
	}
	last := ""
	for _, line := range strings.Split(string(src), "\n") {
		if f := strings.Fields(line); len(f) >= 4 && f[0] == "FROM" {
			last = f[len(f)-1]
		}
	}
	if last != "cpu" {
		t.Errorf("the default (last) stage is %q, want cpu", last)
	}
	for _, stage := range []string{"cpu", "cuda"} {
		lines := stages[stage]
		has := func(prefix, sub string) bool {
			return slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, prefix) && strings.Contains(l, sub) })
		}
		for _, bin := range []string{"router", "ctxserver", "genserver"} {
			if !has("COPY", "/out/"+bin) || !has("COPY", "/usr/local/bin/") {
				t.Errorf("stage %s: %s is not copied to /usr/local/bin", stage, bin)
			}
		}
		if !has("COPY", "/opt/kvferry/llama") || !has("ENV", "KVFERRY_LLAMA_LIB_DIR=/opt/kvferry/llama") {
			t.Errorf("stage %s: the llama.cpp libraries are not at the binaries' --llama-lib-dir", stage)
		}
		if !slices.Contains(lines, "USER 65532:65532") {
			t.Errorf("stage %s: not USER 65532:65532 (the chart's runAsUser)", stage)
		}
	}
}
