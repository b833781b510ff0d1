package e2e

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/pkg/ticket"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

const trustDomain = "e2e.kvferry"

func tlsFlags(f identity.Files) []string {
	return []string{"--tls-cert=" + f.Cert, "--tls-key=" + f.Key, "--tls-ca=" + f.CA, "--tls-trust-domain=" + trustDomain}
}

// TestTLSAndMTLS runs a full stack with role certificates (make certs'
// kind): the OpenAI port is HTTPS, router↔servers, generation↔context and
// the KV data connections (--data-tls) are mutual TLS checked by role (the router turns ready, and a completion
// equals the reference, only through it). Then it plays the attacks a
// holder of a stolen or foreign certificate would: each is refused with
// the precise code, and every block stays accounted for.
func TestTLSAndMTLS(t *testing.T) {
	fleet, err := identity.NewCA("fleet", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	files, err := fleet.WriteRoles(t.TempDir(), trustDomain, []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// --data-tls: the KV itself crosses in mutual TLS too.
	s := stack.Up(t, binDir, stack.Options{CtxArgs: append(tlsFlags(files[identity.CtxServer]), "--data-tls"), GenArgs: append(tlsFlags(files[identity.GenServer]), "--data-tls", "--canary-interval=200ms", "--health-interval=100ms"),
		ExtraRouterArgs: tlsFlags(files[identity.Router])})
	pool := fleet.Pool()
	base := "https" + s.OpenAIURL[len("http"):]
	httpc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	c := openai.NewClient(option.WithBaseURL(base+"/"), option.WithAPIKey("unused"), option.WithMaxRetries(0), option.WithHTTPClient(httpc))
	seed := int64(3)
	want := executor.Reference(tiny, "the river", router.SamplingFor(8, nil, nil, &seed))
	resp, err := c.Completions.New(testCtx(t), openai.CompletionNewParams{Model: "tiny",
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("the river")}, MaxTokens: openai.Int(8), Seed: openai.Int(seed)})
	if err != nil || resp.Choices[0].Text != want.Text {
		t.Fatalf("over TLS: %v %v, reference %q", resp, err, want.Text)
	}
	// Plain HTTP gets Go's "client sent an HTTP request to an HTTPS server".
	if code := probe(s.OpenAIURL + "/models"); code == http.StatusOK {
		t.Fatal("plain HTTP served on the TLS port")
	}

	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	// dial connects to addr presenting cert, checking the server is a role.
	dial := func(addr string, cert tls.Certificate, server identity.Role) *grpc.ClientConn {
		cfg := &tls.Config{RootCAs: pool, VerifyConnection: identity.Expect(trustDomain, server), MinVersion: tls.VersionTLS12}
		if cert.Certificate != nil {
			cfg.Certificates = []tls.Certificate{cert}
		}
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return cc
	}
	load := func(r identity.Role) tls.Certificate {
		kp, err := tls.LoadX509KeyPair(files[r].Cert, files[r].Key)
		if err != nil {
			t.Fatal(err)
		}
		return kp
	}
	// The pair canary, which the completion above started, runs through
	// TransferService, which a generation server's certificate may call:
	// it succeeds round after round, well past three intervals, and the
	// pair stays ready (it called ContextService, was refused, and the
	// router turned unready).
	gh := kvferryv1.NewHealthServiceClient(dial(s.GenGRPC, load(identity.Router), identity.GenServer))
	rounds, last := 0, int64(0)
	stack.Eventually(t, "five successful canaries under mTLS", func() bool {
		h, err := gh.GetHealth(testCtx(t), &kvferryv1.GetHealthRequest{})
		if err != nil || len(h.GetCanary().GetPeers()) != 1 {
			return false
		}
		p := h.GetCanary().GetPeers()[0]
		if !p.GetOk() {
			t.Fatalf("pair canary failed under mTLS: %s", p.GetError())
		}
		if p.GetLastUnixNanos() != last {
			rounds, last = rounds+1, p.GetLastUnixNanos()
		}
		return rounds >= 5 && h.GetReady()
	})
	if code := probe(s.RouterAdmin + "/readyz"); code != http.StatusOK {
		t.Fatalf("router readyz %d after the canaries", code)
	}
	// ReleaseCanary, open to generation servers, frees only canaries: a
	// routed request's ticket is not released by it.
	if r, err := kvferryv1.NewTransferServiceClient(dial(s.CtxGRPC, load(identity.GenServer), identity.CtxServer)).ReleaseCanary(ctx,
		&kvferryv1.ReleaseCanaryRequest{Ticket: ticket.New(ticket.NewID())}); err != nil || r.GetReleased() {
		t.Fatalf("ReleaseCanary of a ticket Canary did not start: %v %v", r, err)
	}
	prefill := &kvferryv1.PrefillRequest{Ticket: ticket.New(ticket.NewID()), PromptTokens: []uint32{1, 2, 3}, Sampling: &kvferryv1.SamplingParams{MaxTokens: 4, Temperature: 1, TopP: 1}}

	// A generation server's certificate cannot prefill (only routers do).
	asGen := dial(s.CtxGRPC, load(identity.GenServer), identity.CtxServer)
	if _, err := kvferryv1.NewContextServiceClient(asGen).Prefill(ctx, prefill); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Prefill with a genserver certificate: %v, want PERMISSION_DENIED", err)
	}
	// A router's certificate cannot ask for a transfer (only generation
	// servers do).
	asRouter := dial(s.CtxGRPC, load(identity.Router), identity.CtxServer)
	transfer := func(cc *grpc.ClientConn, endpoint string) error {
		st, err := kvferryv1.NewTransferServiceClient(cc).Transfer(ctx, &kvferryv1.TransferRequest{Ticket: ticket.New(ticket.NewID()), SessionId: 7,
			ProtocolVersion: kvtransfer.ProtocolVersion, Transport: kvtransfer.TransportTCP, DataEndpoint: endpoint})
		if err != nil {
			return err
		}
		_, err = st.Recv()
		return err
	}
	if err := transfer(asRouter, "127.0.0.1:1"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Transfer with a router certificate: %v, want PERMISSION_DENIED", err)
	}
	// A generation server may not send KV to an address its certificate
	// does not name (127.0.0.2 is loopback, but not in the SANs).
	if err := transfer(asGen, "127.0.0.2:9"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Transfer to an unvouched data endpoint: %v, want PERMISSION_DENIED", err)
	}
	// A router's role signed by a CA the fleet does not trust fails the
	// handshake; a certificate of the fleet's CA naming the router role in
	// another trust domain is refused by role.
	issue := func(ca *identity.CA, domain string) tls.Certificate {
		kp, err := ca.KeyPair([]*url.URL{identity.URI(domain, identity.Router)}, []string{"127.0.0.1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return kp
	}
	attacker, err := identity.NewCA("attacker", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kvferryv1.NewContextServiceClient(dial(s.CtxGRPC, issue(attacker, trustDomain), identity.CtxServer)).Prefill(ctx, prefill); status.Code(err) != codes.Unavailable {
		t.Fatalf("Prefill with a certificate of another CA: %v, want UNAVAILABLE (handshake refused)", err)
	}
	if _, err := kvferryv1.NewContextServiceClient(dial(s.CtxGRPC, issue(fleet, "other.domain"), identity.CtxServer)).Prefill(ctx, prefill); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Prefill with a router certificate of another trust domain: %v, want PERMISSION_DENIED", err)
	}
	// Any certificate of the fleet may read health; a client without one
	// may not connect, and plaintext is refused.
	if _, err := healthpb.NewHealthClient(asRouter).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health with a fleet certificate: %v", err)
	}
	if _, err := healthpb.NewHealthClient(dial(s.CtxGRPC, tls.Certificate{}, identity.CtxServer)).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil {
		t.Fatal("context server accepted a client without a certificate")
	}
	plain, _ := grpc.NewClient(s.GenGRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer plain.Close()
	if _, err := healthpb.NewHealthClient(plain).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil {
		t.Fatal("generation server accepted plaintext")
	}
	// A client expecting a context server at the generation server's
	// address refuses it in the handshake.
	if _, err := healthpb.NewHealthClient(dial(s.GenGRPC, load(identity.Router), identity.CtxServer)).Check(ctx, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("a genserver answering as a ctxserver: %v, want UNAVAILABLE", err)
	}
	checkIdle(t, s)
	s.StopAll(t)
}
