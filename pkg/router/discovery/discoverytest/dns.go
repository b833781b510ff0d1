// Package discoverytest has a DNS server stub for discovery tests.
package discoverytest

import (
	"net"
	"sync"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// StubDNS is a local DNS server answering A queries for one name from a
// list the test changes; other names get NXDOMAIN.
type StubDNS struct {
	name string
	mu   sync.Mutex
	ips  [][4]byte
	conn net.PacketConn
	done chan struct{}
}

// NewStubDNS starts a stub on 127.0.0.1 (UDP); the test's cleanup stops it.
func NewStubDNS(t testing.TB, name string, ips ...[4]byte) *StubDNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &StubDNS{name: name, ips: ips, conn: pc, done: make(chan struct{})}
	go s.serve()
	t.Cleanup(func() { _ = pc.Close(); <-s.done })
	return s
}

// Addr returns the server's host:port, for discovery.Resolver.
func (s *StubDNS) Addr() string { return s.conn.LocalAddr().String() }

// Set replaces the addresses the name resolves to.
func (s *StubDNS) Set(ips ...[4]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ips = ips
}

func (s *StubDNS) serve() {
	defer close(s.done)
	buf := make([]byte, 512)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		var p dnsmessage.Parser
		h, err := p.Start(buf[:n])
		if err != nil {
			continue
		}
		q, err := p.Question()
		if err != nil {
			continue
		}
		resp := dnsmessage.Message{Header: dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true}, Questions: []dnsmessage.Question{q}}
		s.mu.Lock()
		if q.Name.String() == s.name && q.Type == dnsmessage.TypeA {
			for _, ip := range s.ips {
				resp.Answers = append(resp.Answers, dnsmessage.Resource{
					Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 1},
					Body:   &dnsmessage.AResource{A: ip},
				})
			}
		}
		if len(resp.Answers) == 0 && q.Type == dnsmessage.TypeA {
			resp.RCode = dnsmessage.RCodeNameError
		}
		s.mu.Unlock()
		out, err := resp.Pack()
		if err == nil {
			_, _ = s.conn.WriteTo(out, from)
		}
	}
}
