// Package identity names who a TLS peer is and decides what it may call.
//
// Every kvferry certificate carries its role as a URI SAN,
// spiffe://<trust-domain>/kvferry/<role>. A server admits a gRPC call
// only from the roles that call that service (Policy); a client checks the
// server it dialled has the role it meant to reach (Expect). The trust
// domain is a flag, so one CA can serve several clusters apart.
package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Role is what a process is in the fleet.
type Role string

// The roles.
const (
	Router    Role = "router"
	CtxServer Role = "ctxserver"
	GenServer Role = "genserver"
)

// Roles lists every role, in a fixed order.
var Roles = []Role{Router, CtxServer, GenServer}

// DefaultTrustDomain is --tls-trust-domain's default.
const DefaultTrustDomain = "kvferry.local"

// URI is the URI SAN naming role in trustDomain.
func URI(trustDomain string, role Role) *url.URL {
	return &url.URL{Scheme: "spiffe", Host: trustDomain, Path: "/kvferry/" + string(role)}
}

// ErrNoRole: the certificate names no kvferry role in the trust domain.
var ErrNoRole = errors.New("identity: certificate names no kvferry role in the trust domain")

// RoleOf returns the role a verified certificate names in trustDomain.
// A certificate naming two roles is refused: a role is one job.
func RoleOf(cert *x509.Certificate, trustDomain string) (Role, error) {
	var found []Role
	for _, u := range cert.URIs {
		if u.Scheme != "spiffe" || u.Host != trustDomain || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			continue
		}
		name, ok := strings.CutPrefix(u.Path, "/kvferry/")
		if !ok || !slices.Contains(Roles, Role(name)) {
			continue
		}
		found = append(found, Role(name))
	}
	switch len(found) {
	case 0:
		return "", ErrNoRole
	case 1:
		return found[0], nil
	default:
		return "", fmt.Errorf("identity: certificate names %d roles", len(found))
	}
}

// verifiedLeaf is the peer's verified leaf certificate, nil when the
// connection is not TLS or the peer sent none.
func verifiedLeaf(ctx context.Context) *x509.Certificate {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return nil
	}
	return info.State.VerifiedChains[0][0]
}

// Any, in a Policy, admits every peer with a verified certificate of the
// CA, whatever its role (health checks, probes).
const Any Role = "*"

// Policy maps a gRPC service ("kvferry.v1.ContextService") to the roles
// that may call it. A service not listed is refused to everyone.
type Policy struct {
	TrustDomain string
	Services    map[string][]Role
}

// Authorize admits or refuses a call to fullMethod ("/pkg.Service/Method")
// from the peer in ctx: UNAUTHENTICATED without a verified certificate,
// PERMISSION_DENIED for a role the service does not admit.
func (p Policy) Authorize(ctx context.Context, fullMethod string) error {
	leaf := verifiedLeaf(ctx)
	if leaf == nil {
		return status.Error(codes.Unauthenticated, "a client certificate is required")
	}
	service, _, _ := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	allowed, ok := p.Services[service]
	if !ok {
		return status.Errorf(codes.PermissionDenied, "%s is served to no role", service)
	}
	if slices.Contains(allowed, Any) {
		return nil
	}
	role, err := RoleOf(leaf, p.TrustDomain)
	if err != nil {
		return status.Errorf(codes.PermissionDenied, "%s: %v", service, err)
	}
	if !slices.Contains(allowed, role) {
		return status.Errorf(codes.PermissionDenied, "%s does not admit the %s role", service, role)
	}
	return nil
}

// ServerOptions are the interceptors that apply the policy to every call.
func (p Policy) ServerOptions() []grpc.ServerOption {
	return Guard(func(ctx context.Context, fullMethod string) (context.Context, error) {
		return ctx, p.Authorize(ctx, fullMethod)
	})
}

// Guard returns interceptors that run check before every unary and
// streaming call and refuse the call with check's error (the policy here,
// API keys on the router's public port). The handler runs with the
// context check returns (the API key's tenant, say).
func Guard(check func(ctx context.Context, fullMethod string) (context.Context, error)) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			ctx, err := check(ctx, info.FullMethod)
			if err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			ctx, err := check(ss.Context(), info.FullMethod)
			if err != nil {
				return err
			}
			if ctx != ss.Context() {
				ss = contextStream{ServerStream: ss, ctx: ctx}
			}
			return h(srv, ss)
		}),
	}
}

// contextStream is a server stream with the context Guard's check gave.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s contextStream) Context() context.Context { return s.ctx }

// Expect returns a tls.Config VerifyConnection hook: the peer's verified
// certificate must name role in trustDomain, so a client never talks to a
// server of the wrong job (a generation server dialling an address that
// answers with a router's certificate), nor a data listener to a client of
// the wrong job.
func Expect(trustDomain string, role Role) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
			return errors.New("identity: the peer's certificate is not verified")
		}
		got, err := RoleOf(cs.VerifiedChains[0][0], trustDomain)
		if err != nil {
			return err
		}
		if got != role {
			return fmt.Errorf("identity: want a %s, the peer is a %s", role, got)
		}
		return nil
	}
}

// ExpectServer is a client's whole check of the server it dialled, for a
// tls.Config with InsecureSkipVerify (which turns off only Go's own check):
// the server's chain must verify against roots for server use, and its
// leaf must name role in trustDomain. The identity of a kvferry peer is its
// role URI, not the address it was dialled at (SPIFFE's rule for X.509
// identities): pods are dialled by IPs that churn, which a certificate
// issued per role — cert-manager's Certificate shared by a Deployment —
// cannot name. Where a peer's address matters, for the KV data endpoint, it
// is checked against the certificate (CheckEndpoint).
func ExpectServer(roots *x509.CertPool, trustDomain string, role Role) func(tls.ConnectionState) error {
	check := Expect(trustDomain, role)
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("identity: the server presented no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		chains, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if err != nil {
			return fmt.Errorf("identity: the server's certificate: %w", err)
		}
		cs.VerifiedChains = chains
		return check(cs)
	}
}

// ErrEndpointNotVouched: a data endpoint the caller's certificate does not
// name.
var ErrEndpointNotVouched = errors.New("identity: the data endpoint is not an address of the caller's certificate")

// CheckEndpoint admits hostport as a place to push KV bytes only when the
// verified certificate of the caller in ctx names its host (an IP SAN or a
// DNS SAN). A context server pushes a prompt's KV to the endpoint a
// TransferRequest names; without this a holder of any generation-server
// certificate could name another address and have the KV sent there.
func CheckEndpoint(ctx context.Context, hostport string) error {
	leaf := verifiedLeaf(ctx)
	if leaf == nil {
		return status.Error(codes.Unauthenticated, "a client certificate is required")
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "data endpoint %q: %v", hostport, err)
	}
	if leaf.VerifyHostname(host) == nil { // an IP host is checked against the IP SANs
		return nil
	}
	return status.Errorf(codes.PermissionDenied, "%v: %s", ErrEndpointNotVouched, host)
}
