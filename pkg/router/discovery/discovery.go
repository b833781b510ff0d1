// Package discovery finds the router's context and generation servers: a
// static list, or a DNS name (a Kubernetes headless Service) re-resolved
// periodically, so servers come and go without a router restart.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"time"
)

// Source yields the current server addresses (host:port) of one role.
type Source interface {
	Resolve(ctx context.Context) ([]string, error)
	String() string
}

// Static is a fixed list.
type Static []string

// Resolve returns the list.
func (s Static) Resolve(context.Context) ([]string, error) { return s, nil }

func (s Static) String() string { return strings.Join(s, ",") }

// DNS resolves Host to its addresses (A and AAAA) and pairs each with Port.
type DNS struct {
	Host     string
	Port     string
	Resolver *net.Resolver
}

// Resolve looks the name up now; the answer is sorted for stable order.
func (d DNS) Resolve(ctx context.Context) ([]string, error) {
	ips, err := d.Resolver.LookupHost(ctx, d.Host)
	if err != nil {
		return nil, fmt.Errorf("discovery: resolve %s: %w", d.Host, err)
	}
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = net.JoinHostPort(ip, d.Port)
	}
	sort.Strings(out)
	return out, nil
}

func (d DNS) String() string { return "dns:" + d.Host + ":" + d.Port }

// Parse reads a --ctx-servers / --gen-servers value: "dns:NAME:PORT" for a
// DNS name, else a comma-separated list of host:port.
func Parse(spec string, resolver *net.Resolver) (Source, error) {
	if rest, ok := strings.CutPrefix(spec, "dns:"); ok {
		host, port, err := net.SplitHostPort(rest)
		if err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("%q: want dns:NAME:PORT", spec)
		}
		return DNS{Host: host, Port: port, Resolver: resolver}, nil
	}
	var list Static
	for _, p := range strings.Split(spec, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(p); err != nil {
			return nil, fmt.Errorf("%q: %w", p, err)
		}
		list = append(list, p)
	}
	if len(list) == 0 {
		return nil, errors.New("needs at least one address")
	}
	return list, nil
}

// Resolver returns the system resolver, or one that asks only the DNS
// server at addr (host:port) when addr is set.
func Resolver(addr string) *net.Resolver {
	if addr == "" {
		return net.DefaultResolver
	}
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			d.Timeout = 2 * time.Second
			return d.DialContext(ctx, network, addr)
		},
	}
}
