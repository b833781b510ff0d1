package serving

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvferry/kvferry/pkg/identity"
)

// TLSFiles are the --tls-cert, --tls-key and --tls-ca flags. With a cert
// and key, a process serves TLS (gRPC, and the router's OpenAI port) and
// presents the cert as a client; with a CA it verifies its peers: servers
// then require client certificates (mTLS between router and servers, and
// between generation and context servers). Admin ports (probes, metrics)
// and the bulk data path stay plain.
// TrustDomain is the SPIFFE trust domain of the role URIs (package
// identity): with a CA, servers admit calls by the caller's role and
// clients check the role of the server they dial.
type TLSFiles struct{ Cert, Key, CA, TrustDomain string }

// Enabled reports whether any TLS flag is set.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// Validate checks that cert and key come together, with a CA, and the
// files load.
func (f TLSFiles) Validate() error {
	if !f.Enabled() {
		return nil
	}
	if (f.Cert == "") != (f.Key == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	if f.Cert != "" && f.CA == "" {
		// Without a CA, servers would serve TLS to any client, certificate
		// or not, and clients would trust any server the system trusts:
		// encryption without the role checks the security model rests on.
		return errors.New("--tls-cert needs --tls-ca: without it no peer's certificate or role is checked")
	}
	_, err := f.config(false, false)
	return err
}

func (f TLSFiles) config(server, requireClient bool) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.Cert != "" {
		kp, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	if f.CA != "" {
		pem, err := os.ReadFile(f.CA)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls: no certificate in %s", f.CA)
		}
		if server {
			cfg.ClientCAs = pool
			if requireClient {
				cfg.ClientAuth = tls.RequireAndVerifyClientCert
			}
		} else {
			cfg.RootCAs = pool
		}
	}
	return cfg, nil
}

// ServerConfig is the TLS config of a listener; nil when TLS is off.
// requireClient asks for and verifies client certificates (needs a CA).
func (f TLSFiles) ServerConfig(requireClient bool) (*tls.Config, error) {
	if f.Cert == "" {
		return nil, nil
	}
	return f.config(true, requireClient && f.CA != "")
}

// ServerOption is the gRPC server credentials option (none when TLS is off).
func (f TLSFiles) ServerOption(requireClient bool) ([]grpc.ServerOption, error) {
	cfg, err := f.ServerConfig(requireClient)
	if err != nil || cfg == nil {
		return nil, err
	}
	return []grpc.ServerOption{grpc.Creds(credentials.NewTLS(cfg))}, nil
}

// DialOption is the gRPC client credentials: TLS verifying peers against
// the CA (and presenting the cert) when a CA is set, else plaintext. With
// a CA the server must also present the role it is dialled as.
func (f TLSFiles) DialOption(server identity.Role) (grpc.DialOption, error) {
	if f.CA == "" {
		return grpc.WithTransportCredentials(insecure.NewCredentials()), nil
	}
	cfg, err := f.config(false, false)
	if err != nil {
		return nil, err
	}
	verifyByRole(cfg, f.TrustDomain, server)
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}

// DataConfigs are the TLS configs of the tcp data path (--data-tls): the
// generation server's listener requires a context server's certificate,
// the context server's writer requires a generation server's. The
// listener sends no session tickets, so a pooled connection stays silent
// (the writer peeks it for a close before reuse).
func (f TLSFiles) DataConfigs() (server, client *tls.Config, err error) {
	if f.Cert == "" || f.CA == "" {
		return nil, nil, errors.New("--data-tls needs --tls-cert, --tls-key and --tls-ca")
	}
	if server, err = f.config(true, true); err != nil {
		return nil, nil, err
	}
	server.VerifyConnection = identity.Expect(f.TrustDomain, identity.CtxServer)
	server.SessionTicketsDisabled = true
	if client, err = f.config(false, false); err != nil {
		return nil, nil, err
	}
	verifyByRole(client, f.TrustDomain, identity.GenServer)
	return server, client, nil
}

// verifyByRole makes a client config check the server by its chain and
// role only (identity.ExpectServer), not by the address it was dialled at.
func verifyByRole(cfg *tls.Config, trustDomain string, role identity.Role) {
	cfg.InsecureSkipVerify = true // replaced, not dropped: ExpectServer verifies the chain
	cfg.VerifyConnection = identity.ExpectServer(cfg.RootCAs, trustDomain, role)
}

// Policy is the role check of a server's gRPC services: none without a
// CA (no verified peers to name), else the interceptors of
// identity.Policy with services mapping each service to its callers.
func (f TLSFiles) Policy(services map[string][]identity.Role) []grpc.ServerOption {
	if f.CA == "" || f.Cert == "" {
		return nil
	}
	return identity.Policy{TrustDomain: f.TrustDomain, Services: services}.ServerOptions()
}
