package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvferry/kvferry/pkg/executor"
	"github.com/kvferry/kvferry/pkg/router"
	"github.com/kvferry/kvferry/test/stack"
)

// testPKI writes a CA and one certificate for 127.0.0.1, good for both
// server and client authentication, and returns the file paths.
func testPKI(t *testing.T) (caFile, certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kvferry test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kvferry"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	pool = x509.NewCertPool()
	pool.AddCert(caCert)
	return write("ca.pem", "CERTIFICATE", caDER), write("cert.pem", "CERTIFICATE", der), write("key.pem", "PRIVATE KEY", keyDER), pool
}

// TestTLSAndMTLS: with --tls-* on all three binaries the OpenAI port is
// HTTPS, router↔servers and generation↔context are mutual TLS (the router
// turns ready only through it), and a server refuses a client without a
// certificate.
func TestTLSAndMTLS(t *testing.T) {
	ca, cert, key, pool := testPKI(t)
	flags := []string{"--tls-cert=" + cert, "--tls-key=" + key, "--tls-ca=" + ca}
	s := stack.Up(t, binDir, stack.Options{CtxArgs: flags, GenArgs: flags, ExtraRouterArgs: flags})
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
	// A client with the CA but no certificate is refused by a server.
	cc, err := grpc.NewClient(s.CtxGRPC, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(testCtx(t), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: "readiness"}); err == nil {
		t.Fatal("context server accepted a client without a certificate")
	}
	plain, _ := grpc.NewClient(s.GenGRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer plain.Close()
	if _, err := healthpb.NewHealthClient(plain).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil {
		t.Fatal("generation server accepted plaintext")
	}
	checkIdle(t, s)
	s.StopAll(t)
}
