package router

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvferry/kvferry/pkg/identity"
	"github.com/kvferry/kvferry/pkg/routine"
)

// Keys are the API keys the public surfaces (OpenAI HTTP and the gRPC
// RouterService) accept. Keys are kept as sha256 digests and compared in
// constant time, every key every time; the set can be replaced while
// serving (WatchFile). A nil or empty Keys accepts everything.
//
// Each key belongs to a tenant: the label after it in the key file, or
// the key alone. Tenants do not share prefix-cache blocks (the router
// salts each Prefill with the tenant: no timing oracle on another
// tenant's prompts) and only the tenant that started a request may cancel
// it.
type Keys struct {
	set atomic.Pointer[keySet]
}

type keySet struct {
	digests [][sha256.Size]byte
	tenants []string
}

// Key is one accepted key and its tenant label ("": the key's own).
type Key struct{ Secret, Tenant string }

// NewKeys returns the set of keys.
func NewKeys(keys []Key) *Keys {
	k := &Keys{}
	k.Set(keys)
	return k
}

// Set replaces the accepted keys.
func (k *Keys) Set(keys []Key) {
	s := &keySet{digests: make([][sha256.Size]byte, len(keys)), tenants: make([]string, len(keys))}
	for i, key := range keys {
		s.digests[i] = sha256.Sum256([]byte(key.Secret))
		s.tenants[i] = "tenant:" + key.Tenant
		if key.Tenant == "" {
			// The key's own tenant, named by a digest prefix: never the
			// key itself, which must not travel to the servers.
			s.tenants[i] = "key:" + hex.EncodeToString(s.digests[i][:8])
		}
	}
	k.set.Store(s)
}

// Enabled reports whether keys are required.
func (k *Keys) Enabled() bool {
	if k == nil {
		return false
	}
	s := k.set.Load()
	return s != nil && len(s.digests) > 0
}

// Tenant reports whether token is an accepted key and its tenant, in time
// independent of which key (if any) it matches. Without keys every
// caller is the one tenant "".
func (k *Keys) Tenant(token string) (tenant string, ok bool) {
	if !k.Enabled() {
		return "", true
	}
	got := sha256.Sum256([]byte(token))
	s := k.set.Load()
	idx := -1
	for i, want := range s.digests {
		idx = subtle.ConstantTimeSelect(subtle.ConstantTimeCompare(got[:], want[:]), i, idx)
	}
	if idx < 0 {
		return "", false
	}
	return s.tenants[idx], true
}

// Check reports whether token is an accepted key.
func (k *Keys) Check(token string) bool {
	_, ok := k.Tenant(token)
	return ok
}

// BearerTenant is Tenant of an Authorization value ("Bearer <key>").
func (k *Keys) BearerTenant(header string) (tenant string, ok bool) {
	if !k.Enabled() {
		return "", true
	}
	key, ok := strings.CutPrefix(header, "Bearer ")
	if !ok {
		return "", false
	}
	return k.Tenant(strings.TrimSpace(key))
}

// CheckBearer checks an Authorization value ("Bearer <key>").
func (k *Keys) CheckBearer(header string) bool {
	_, ok := k.BearerTenant(header)
	return ok
}

// MetadataTenant is the tenant of the first accepted key in ctx's gRPC
// authorization metadata.
func (k *Keys) MetadataTenant(ctx context.Context) (tenant string, ok bool) {
	if !k.Enabled() {
		return "", true
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if tenant, ok := k.BearerTenant(v); ok {
			return tenant, true
		}
	}
	return "", false
}

// ReadKeysFile reads one key per line, optionally followed by white space
// and its tenant label; blank lines and # comments are skipped. A file
// without keys is an error.
func ReadKeysFile(path string) ([]Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseKeys(b)
}

func parseKeys(b []byte) ([]Key, error) {
	var keys []Key
	for i, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) > 2 {
			return nil, fmt.Errorf("line %d: want KEY or KEY TENANT, got %d fields", i+1, len(f))
		}
		key := Key{Secret: f[0]}
		if len(f) == 2 {
			key.Tenant = f[1]
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, errors.New("no keys in the file")
	}
	return keys, nil
}

// WatchFile re-reads path every interval until ctx ends and replaces the
// keys when its content changed. A file that cannot be read or holds no
// key keeps the keys in force (and is logged): a bad edit never opens the
// API.
func (k *Keys) WatchFile(ctx context.Context, path string, interval time.Duration, lg *zap.Logger) {
	last, _ := os.ReadFile(path)
	routine.Every(ctx, interval, func(time.Time) {
		b, err := os.ReadFile(path)
		if err != nil {
			lg.Warn("API key file unreadable; keeping the keys in force", zap.String("path", path), zap.Error(err))
			return
		}
		if bytes.Equal(b, last) {
			return
		}
		keys, err := parseKeys(b)
		if err != nil {
			lg.Warn("API key file has no keys; keeping the keys in force", zap.String("path", path))
			return
		}
		last = b
		k.Set(keys)
		lg.Info("API keys reloaded", zap.String("path", path), zap.Int("keys", len(keys)))
	})
}

// routerServicePrefix names the methods the keys guard on gRPC: the
// public RouterService; health stays open for probes.
const routerServicePrefix = "/kvferry.v1.RouterService/"

// admit checks the key of a RouterService call and returns ctx carrying
// its tenant (TenantOf), so that the handler need not check it again.
func (k *Keys) admit(ctx context.Context, method string) (context.Context, error) {
	if !strings.HasPrefix(method, routerServicePrefix) || !k.Enabled() {
		return ctx, nil
	}
	tenant, ok := k.MetadataTenant(ctx)
	if !ok {
		return ctx, status.Error(codes.Unauthenticated, "missing or incorrect API key: send authorization: Bearer <key> metadata")
	}
	return withTenant(ctx, tenant), nil
}

// GRPCOptions are the interceptors that check the keys on RouterService
// and hand the key's tenant to the handler in its context.
func (k *Keys) GRPCOptions() []grpc.ServerOption { return identity.Guard(k.admit) }

type tenantKey struct{}

func withTenant(ctx context.Context, tenant string) context.Context {
	return context.WithValue(ctx, tenantKey{}, tenant)
}

// TenantOf is the tenant of the API key that was admitted for the request
// in ctx ("" without keys).
func TenantOf(ctx context.Context) string {
	t, _ := ctx.Value(tenantKey{}).(string)
	return t
}
