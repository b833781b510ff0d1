package health

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvferry/kvferry/pkg/blockpool"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestReadinessFollowsDrainingAndCheck(t *testing.T) {
	pool, _ := blockpool.New(8, 16)
	ready := true
	reg := prometheus.NewRegistry()
	c := New(reg, pool, func(context.Context) (bool, string, string) {
		if ready {
			return true, "", ""
		}
		return false, "no_backend", "no backend is ready"
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	c.Register(gs)
	go func() { _ = gs.Serve(ln) }()
	defer gs.Stop()
	cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	mux := http.NewServeMux()
	c.Routes(mux)

	check := func(name string, live, readyWant bool, reason string) {
		t.Helper()
		ctx := context.Background()
		st := c.Evaluate(ctx)
		if st.Live != live || st.Ready != readyWant || st.Reason != reason {
			t.Fatalf("%s: status %+v, want live %v ready %v reason %q", name, st, live, readyWant, reason)
		}
		for svc, want := range map[string]bool{ServiceLiveness: live, ServiceReadiness: readyWant, "": live && readyWant} {
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetStatus() == healthpb.HealthCheckResponse_SERVING; got != want {
				t.Fatalf("%s: grpc %q serving %v, want %v", name, svc, got, want)
			}
		}
		for path, want := range map[string]bool{"/livez": live, "/readyz": readyWant} {
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
			if (rec.Code == http.StatusOK) != want {
				t.Fatalf("%s: %s answered %d", name, path, rec.Code)
			}
			var body Status
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Reason != reason {
				t.Fatalf("%s: %s body %s", name, path, rec.Body)
			}
		}
		want := fmt.Sprintf("# HELP kvferry_health_ready 1 when the process is ready for traffic, else 0.\n# TYPE kvferry_health_ready gauge\nkvferry_health_ready %d\n", map[bool]int{false: 0, true: 1}[readyWant])
		if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kvferry_health_ready"); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		snap, err := kvferryv1.NewHealthServiceClient(cc).GetHealth(ctx, &kvferryv1.GetHealthRequest{})
		if err != nil || snap.GetReady() != readyWant || snap.GetReason() != reason || snap.GetPool().GetCapacity() != 8 || snap.GetPool().GetFree() != 8 {
			t.Fatalf("%s: GetHealth %+v %v", name, snap, err)
		}
	}
	check("serving", true, true, ReasonOK)
	ready = false
	check("backend down", true, false, "no_backend")
	ready = true
	c.SetDraining()
	check("draining", true, false, ReasonDraining)
}
