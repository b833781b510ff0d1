package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority for local runs and tests (make certs): an
// ECDSA P-256 key and a self-signed certificate. Production fleets bring
// their own (cert-manager, SPIRE); nothing here is used by the servers.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	der  []byte
}

// NewCA makes a CA valid for validity from now.
func NewCA(name string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(validity),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{cert: cert, key: key, der: der}, nil
}

// CertPEM is the CA certificate, PEM encoded (the --tls-ca file).
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.der})
}

// Pool is a cert pool holding the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// Issue signs a leaf certificate good for server and client authentication
// that names uris (the role) and hosts (IP addresses or DNS names). It
// returns the certificate and its PKCS#8 key, PEM encoded.
func (ca *CA) Issue(uris []*url.URL, hosts []string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "kvferry"}, URIs: uris,
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), nil
}

// KeyPair is Issue's certificate and key, ready for a tls.Config.
func (ca *CA) KeyPair(uris []*url.URL, hosts []string, validity time.Duration) (tls.Certificate, error) {
	c, k, err := ca.Issue(uris, hosts, validity)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.X509KeyPair(c, k)
}

// Files are the PEM files of one role, as the --tls-* flags take them.
type Files struct{ CA, Cert, Key string }

// WriteDev writes a fresh CA and its role certificates (WriteRoles).
func WriteDev(dir, trustDomain string, hosts []string, validity time.Duration) (map[Role]Files, error) {
	ca, err := NewCA("kvferry dev CA", validity)
	if err != nil {
		return nil, err
	}
	return ca.WriteRoles(dir, trustDomain, hosts, validity)
}

// WriteRoles writes the CA (ca.pem) and one certificate per role
// (<role>.pem, <role>-key.pem, keys 0600) into dir, each role naming its
// URI in trustDomain and the hosts. It returns the files by role.
func (ca *CA) WriteRoles(dir, trustDomain string, hosts []string, validity time.Duration) (map[Role]Files, error) {
	// MkdirAll and WriteFile keep the modes of what exists: a re-run over
	// an older, looser directory or key must tighten them too.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := writeFileMode(caFile, ca.CertPEM(), 0o644); err != nil {
		return nil, err
	}
	out := map[Role]Files{}
	for _, r := range Roles {
		cert, key, err := ca.Issue([]*url.URL{URI(trustDomain, r)}, hosts, validity)
		if err != nil {
			return nil, fmt.Errorf("identity: issue %s: %w", r, err)
		}
		f := Files{CA: caFile, Cert: filepath.Join(dir, string(r)+".pem"), Key: filepath.Join(dir, string(r)+"-key.pem")}
		if err := writeFileMode(f.Cert, cert, 0o644); err != nil {
			return nil, err
		}
		if err := writeFileMode(f.Key, key, 0o600); err != nil {
			return nil, err
		}
		out[r] = f
	}
	return out, nil
}

// writeFileMode writes b to path with exactly mode, an existing file's
// mode included; the mode is set before the content is written.
func writeFileMode(path string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}
