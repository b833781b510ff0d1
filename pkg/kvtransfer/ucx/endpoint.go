package ucx

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

// The ucx endpoint string is built and parsed without cgo, so that it is
// fuzzed in every build: it comes from a peer, through the router.

// ucxRemote is a parsed ucx endpoint.
type ucxRemote struct {
	addr, rkey []byte
	base, size uint64
	id         uint64 // the receiver worker's id: the header of its messages
}

func parseUCXEndpoint(ep string) (ucxRemote, error) {
	parts := strings.Split(ep, ":")
	if len(parts) != 6 || parts[0] != kvtransfer.TransportUCX {
		return ucxRemote{}, fmt.Errorf("%w: ucx endpoint %q", kvtransfer.ErrBadDescriptor, ep)
	}
	var r ucxRemote
	var errs []error
	var err error
	r.addr, err = hex.DecodeString(parts[1])
	errs = append(errs, err)
	r.rkey, err = hex.DecodeString(parts[2])
	errs = append(errs, err)
	r.base, err = strconv.ParseUint(parts[3], 16, 64)
	errs = append(errs, err)
	r.size, err = strconv.ParseUint(parts[4], 16, 64)
	errs = append(errs, err)
	r.id, err = strconv.ParseUint(parts[5], 16, 64)
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil || len(r.addr) == 0 || len(r.rkey) == 0 {
		return ucxRemote{}, fmt.Errorf("%w: ucx endpoint: %v", kvtransfer.ErrBadDescriptor, err)
	}
	return r, nil
}

// String is the endpoint as a ucx receiver advertises it:
// ucx:ADDR:RKEY:BASE:SIZE:ID (addresses and key in hex).
func (r ucxRemote) String() string {
	return strings.Join([]string{kvtransfer.TransportUCX, hex.EncodeToString(r.addr), hex.EncodeToString(r.rkey),
		strconv.FormatUint(r.base, 16), strconv.FormatUint(r.size, 16), strconv.FormatUint(r.id, 16)}, ":")
}
