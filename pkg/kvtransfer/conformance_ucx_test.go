//go:build ucx

package kvtransfer

// The ucx rows: same host over shared memory, and over tcp.
func init() {
	backends = append(backends,
		backend{name: TransportUCX, label: "ucx-posix-cma", env: map[string]string{"UCX_TLS": "posix,cma"}, noDeathProof: true, window: ucxWindow},
		backend{name: TransportUCX, label: "ucx-tcp", env: map[string]string{"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}, noDeathProof: true, window: ucxWindow},
	)
}
