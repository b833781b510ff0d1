package identity_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/identity"
)

const td = "test.kvferry"

func keyPair(t *testing.T, ca *identity.CA, uris []*url.URL, hosts ...string) tls.Certificate {
	t.Helper()
	kp, err := ca.KeyPair(uris, hosts, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func TestRoleOf(t *testing.T) {
	ca, err := identity.NewCA("t", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	parse := func(uris ...*url.URL) (identity.Role, error) {
		kp := keyPair(t, ca, uris, "127.0.0.1")
		return identity.RoleOf(kp.Leaf, td)
	}
	other, _ := url.Parse("spiffe://" + td + "/kvferry/admin")
	web, _ := url.Parse("https://" + td + "/kvferry/router")
	for _, c := range []struct {
		name string
		uris []*url.URL
		want identity.Role
		ok   bool
	}{
		{"router", []*url.URL{identity.URI(td, identity.Router)}, identity.Router, true},
		{"genserver", []*url.URL{identity.URI(td, identity.GenServer)}, identity.GenServer, true},
		{"other trust domain", []*url.URL{identity.URI("evil.example", identity.Router)}, "", false},
		{"unknown role", []*url.URL{other}, "", false},
		{"not spiffe", []*url.URL{web}, "", false},
		{"no uri", nil, "", false},
		{"two roles", []*url.URL{identity.URI(td, identity.Router), identity.URI(td, identity.CtxServer)}, "", false},
	} {
		got, err := parse(c.uris...)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("%s: got %q, %v; want %q ok=%v", c.name, got, err, c.want, c.ok)
		}
	}
}

// TestPolicyOverRealTLS serves the standard health service under a policy
// that admits only routers, on a real socket, and calls it with
// certificates of each kind.
func TestPolicyOverRealTLS(t *testing.T) {
	ca, err := identity.NewCA("t", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srvCert := keyPair(t, ca, []*url.URL{identity.URI(td, identity.GenServer)}, "127.0.0.1")
	pol := identity.Policy{TrustDomain: td, Services: map[string][]identity.Role{healthpb.Health_ServiceDesc.ServiceName: {identity.Router}}}
	opts := append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{srvCert}, ClientCAs: ca.Pool(), ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12,
	}))}, pol.ServerOptions()...)
	gs := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(gs, health.NewServer())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)

	call := func(client tls.Certificate, expect identity.Role) error {
		cfg := &tls.Config{Certificates: []tls.Certificate{client}, RootCAs: ca.Pool(), VerifyConnection: identity.Expect(td, expect), MinVersion: tls.VersionTLS12}
		cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}
	router := keyPair(t, ca, []*url.URL{identity.URI(td, identity.Router)}, "127.0.0.1")
	if err := call(router, identity.GenServer); err != nil {
		t.Fatalf("a router calling a service that admits routers: %v", err)
	}
	ctxsrv := keyPair(t, ca, []*url.URL{identity.URI(td, identity.CtxServer)}, "127.0.0.1")
	if err := call(ctxsrv, identity.GenServer); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a context server calling a router-only service: %v, want PERMISSION_DENIED", err)
	}
	foreign := keyPair(t, ca, []*url.URL{identity.URI("evil.example", identity.Router)}, "127.0.0.1")
	if err := call(foreign, identity.GenServer); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a router of another trust domain: %v, want PERMISSION_DENIED", err)
	}
	// The client side: dialling a generation server while expecting a
	// context server fails in the handshake, before any call is sent.
	if err := call(router, identity.CtxServer); status.Code(err) != codes.Unavailable {
		t.Fatalf("a server of the wrong role: %v, want UNAVAILABLE from the handshake", err)
	}
}

func TestCheckEndpointWithoutPeer(t *testing.T) {
	if err := identity.CheckEndpoint(context.Background(), "127.0.0.1:1"); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no peer: %v", err)
	}
}

// TestExpectServer: a client checks the server by chain and role, not by
// the address it dialled (a per-role certificate names no pod IP), and
// still refuses a server of another role or another CA.
func TestExpectServer(t *testing.T) {
	ca, err := identity.NewCA("t", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := identity.NewCA("other", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	gen := identity.URI(td, identity.GenServer)
	for _, c := range []struct {
		name   string
		server tls.Certificate
		expect identity.Role
		ok     bool
	}{
		{"the role, at an address the certificate does not name", keyPair(t, ca, []*url.URL{gen}, "genserver.example"), identity.GenServer, true},
		{"another role", keyPair(t, ca, []*url.URL{gen}, "genserver.example"), identity.CtxServer, false},
		{"another CA", keyPair(t, other, []*url.URL{gen}, "127.0.0.1"), identity.GenServer, false},
		{"another trust domain", keyPair(t, ca, []*url.URL{identity.URI("evil.example", identity.GenServer)}, "127.0.0.1"), identity.GenServer, false},
	} {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{c.server}, MinVersion: tls.VersionTLS12})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			if conn, err := ln.Accept(); err == nil {
				_ = conn.(*tls.Conn).Handshake()
				_ = conn.Close()
			}
		}()
		conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
			InsecureSkipVerify: true, VerifyConnection: identity.ExpectServer(ca.Pool(), td, c.expect), MinVersion: tls.VersionTLS12,
		})
		if err == nil {
			_ = conn.Close()
		}
		if (err == nil) != c.ok {
			t.Errorf("%s: handshake error %v, want ok=%v", c.name, err, c.ok)
		}
		_ = ln.Close()
		<-done
	}
}

// TestWriteRolesTightensModes: a re-run over a world-readable directory
// and key (an older run, a copy) leaves the directory 0700 and every key
// 0600, as a first run does.
func TestWriteRolesTightensModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	loose := filepath.Join(dir, string(identity.Router)+"-key.pem")
	if err := os.WriteFile(loose, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	ca, err := identity.NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	files, err := ca.WriteRoles(dir, "kvferry.local", []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	mode := func(p string) os.FileMode {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return st.Mode().Perm()
	}
	if m := mode(dir); m != 0o700 {
		t.Errorf("directory mode %o, want 700", m)
	}
	for r, f := range files {
		if m := mode(f.Key); m != 0o600 {
			t.Errorf("%s key mode %o, want 600", r, m)
		}
	}
}
