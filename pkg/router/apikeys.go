package router

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
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
type Keys struct {
	digests atomic.Pointer[[][sha256.Size]byte]
}

// NewKeys returns the set of keys.
func NewKeys(keys []string) *Keys {
	k := &Keys{}
	k.Set(keys)
	return k
}

// Set replaces the accepted keys.
func (k *Keys) Set(keys []string) {
	d := make([][sha256.Size]byte, len(keys))
	for i, key := range keys {
		d[i] = sha256.Sum256([]byte(key))
	}
	k.digests.Store(&d)
}

// Enabled reports whether keys are required.
func (k *Keys) Enabled() bool {
	if k == nil {
		return false
	}
	d := k.digests.Load()
	return d != nil && len(*d) > 0
}

// Check reports whether token is an accepted key, in time independent of
// which key (if any) it matches.
func (k *Keys) Check(token string) bool {
	if !k.Enabled() {
		return true
	}
	got := sha256.Sum256([]byte(token))
	match := 0
	for _, want := range *k.digests.Load() {
		match |= subtle.ConstantTimeCompare(got[:], want[:])
	}
	return match == 1
}

// CheckBearer checks an Authorization value ("Bearer <key>").
func (k *Keys) CheckBearer(header string) bool {
	if !k.Enabled() {
		return true
	}
	key, ok := strings.CutPrefix(header, "Bearer ")
	return ok && k.Check(strings.TrimSpace(key))
}

// ReadKeysFile reads one key per line; blank lines and # comments are
// skipped. A file without keys is an error.
func ReadKeysFile(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseKeys(b)
}

func parseKeys(b []byte) ([]string, error) {
	var keys []string
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			keys = append(keys, line)
		}
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

func (k *Keys) authorize(ctx context.Context, method string) error {
	if !strings.HasPrefix(method, routerServicePrefix) || !k.Enabled() {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if k.CheckBearer(v) {
			return nil
		}
	}
	return status.Error(codes.Unauthenticated, "missing or incorrect API key: send authorization: Bearer <key> metadata")
}

// GRPCOptions are the interceptors that check the keys on RouterService.
func (k *Keys) GRPCOptions() []grpc.ServerOption { return identity.Guard(k.authorize) }
