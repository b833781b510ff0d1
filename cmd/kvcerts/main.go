// Command kvcerts writes a CA and one certificate per kvferry role for
// local mTLS runs and tests (make certs): ca.pem, then router.pem,
// ctxserver.pem and genserver.pem with their -key.pem files, each naming
// its role as spiffe://TRUST-DOMAIN/kvferry/ROLE. Production fleets issue
// the same URIs from their own CA (cert-manager, SPIRE).
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/kvferry/kvferry/pkg/identity"
)

func main() {
	fs := flag.NewFlagSet("kvcerts", flag.ExitOnError)
	dir := fs.String("out", "certs", "directory to write the PEM files into (created 0700)")
	td := fs.String("trust-domain", identity.DefaultTrustDomain, "SPIFFE trust domain of the role URIs (the servers' --tls-trust-domain)")
	hosts := fs.String("hosts", "127.0.0.1,localhost", "comma-separated IP addresses and DNS names every certificate names (a generation server's data endpoint host must be one of them)")
	validity := fs.Duration("validity", 30*24*time.Hour, "how long the certificates are valid")
	_ = fs.Parse(os.Args[1:])
	files, err := identity.WriteDev(*dir, *td, strings.Split(*hosts, ","), *validity)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kvcerts:", err)
		os.Exit(1)
	}
	for _, r := range identity.Roles {
		f := files[r]
		fmt.Printf("%-9s --tls-cert=%s --tls-key=%s --tls-ca=%s --tls-trust-domain=%s\n", r, f.Cert, f.Key, f.CA, *td)
	}
}
