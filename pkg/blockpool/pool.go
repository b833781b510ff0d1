// Package blockpool is the fixed-capacity KV block memory of one server.
//
// Every block is in exactly one state (docs/architecture.md, Blocks): FREE, OWNED (held by one
// or more references), IN_FLIGHT (a transfer may read or write it),
// QUARANTINED (a transfer ended but quiescence is not yet proven) or POISONED
// (quiescence was never proven; out of circulation for good). The states
// always sum to the capacity.
//
// There is one release path: reference counts. A block returns to FREE only
// when its last reference is gone and no transfer pin holds it. Pins are the
// transfer's claim on the memory: a pinned block is IN_FLIGHT whatever its
// references, so dropping the last reference of a block in flight cannot
// free memory a transport may still touch.
//
// Prefix reuse: a block holding a full block of prompt KV can be published
// under the hash chain of its tokens; the reuse cache then holds one
// reference on it, so it stays OWNED after its request ends. Lookup hands
// cached blocks to later requests with the same prefix. Blocks whose only
// reference is the cache's are evicted least recently used first, when an
// allocation would otherwise fail.
//
// Pool memory is one slab allocated at start; Bytes returns a block's slice
// of it. The pool does no I/O and starts no goroutines.
package blockpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// ID names one block of a pool: its index in the slab.
type ID uint32

// State is the state of one block.
type State uint8

// The five block states of docs/architecture.md, Blocks.
const (
	Free State = iota
	Owned
	InFlight
	Quarantined
	Poisoned
	numStates
)

// String returns the state's lower snake case name, as used in metric labels.
func (s State) String() string {
	switch s {
	case Free:
		return "free"
	case Owned:
		return "owned"
	case InFlight:
		return "in_flight"
	case Quarantined:
		return "quarantined"
	case Poisoned:
		return "poisoned"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// States lists every state in order.
func States() []State { return []State{Free, Owned, InFlight, Quarantined, Poisoned} }

// Errors returned by the pool. Callers map them to gRPC codes at the edge.
var (
	// ErrExhausted: not enough free blocks for the allocation.
	ErrExhausted = errors.New("blockpool: not enough free blocks")
	// ErrBadBlock: a block id outside the pool or in a state the operation does not allow.
	ErrBadBlock = errors.New("blockpool: invalid block for operation")
)

// Counts is the number of blocks in each state.
type Counts struct {
	Capacity    int
	Free        int
	Owned       int
	InFlight    int
	Quarantined int
	Poisoned    int
}

// Sum adds the per-state counts; the invariant is Sum() == Capacity.
func (c Counts) Sum() int { return c.Free + c.Owned + c.InFlight + c.Quarantined + c.Poisoned }

// Of returns the count of one state.
func (c Counts) Of(s State) int {
	switch s {
	case Free:
		return c.Free
	case Owned:
		return c.Owned
	case InFlight:
		return c.InFlight
	case Quarantined:
		return c.Quarantined
	case Poisoned:
		return c.Poisoned
	}
	return 0
}

type block struct {
	refs        int32
	pins        int32
	quarantined bool
	poisoned    bool

	cached bool   // the reuse cache holds one of refs
	hash   uint64 // the cache key while cached

	// LRU links of evictable blocks (cached, only the cache's reference, no
	// pin); noBlock when not linked.
	prev, next int32
	inLRU      bool
}

const noBlock = -1

// evictable: the cache's reference is the only thing keeping it.
func (b *block) evictable() bool {
	return b.cached && b.refs == 1 && b.pins == 0 && !b.quarantined && !b.poisoned
}

func (b *block) state() State {
	switch {
	case b.poisoned:
		return Poisoned
	case b.quarantined:
		return Quarantined
	case b.pins > 0:
		return InFlight
	case b.refs > 0:
		return Owned
	}
	return Free
}

// Pool is a fixed set of equally sized blocks in one slab of memory.
// It is safe for concurrent use.
type Pool struct {
	blockSize int
	slab      []byte

	mu     sync.Mutex
	blocks []block
	free   []ID // stack of FREE blocks
	counts [numStates]int

	cache            map[uint64]ID
	lruHead, lruTail int32 // head is the least recently used
	lruLen           int

	// freed is closed (and forgotten) when a block becomes FREE or
	// evictable: what allocation waiters wait for (Freed).
	freed chan struct{}
}

// New returns a pool of capacity blocks of blockSize bytes each, in memory
// of its own.
func New(capacity, blockSize int) (*Pool, error) {
	if err := checkSize(capacity, blockSize); err != nil {
		return nil, err
	}
	return NewWithMemory(capacity, blockSize, make([]byte, capacity*blockSize))
}

func checkSize(capacity, blockSize int) error {
	if capacity <= 0 || blockSize <= 0 {
		return fmt.Errorf("blockpool: capacity %d and block size %d must be positive", capacity, blockSize)
	}
	if uint64(capacity) > 1<<31 {
		return fmt.Errorf("blockpool: capacity %d too large", capacity)
	}
	return nil
}

// NewWithMemory returns a pool over slab, which the caller allocated (a
// shared mapping a transport registered) and keeps alive as long as the
// pool; it must be exactly capacity × blockSize bytes.
func NewWithMemory(capacity, blockSize int, slab []byte) (*Pool, error) {
	if err := checkSize(capacity, blockSize); err != nil {
		return nil, err
	}
	if len(slab) != capacity*blockSize {
		return nil, fmt.Errorf("blockpool: %d bytes of memory for %d blocks of %d", len(slab), capacity, blockSize)
	}
	p := &Pool{
		blockSize: blockSize,
		slab:      slab,
		blocks:    make([]block, capacity),
		free:      make([]ID, capacity),
		cache:     map[uint64]ID{},
		lruHead:   noBlock,
		lruTail:   noBlock,
	}
	for i := range p.blocks {
		p.blocks[i].prev, p.blocks[i].next = noBlock, noBlock
	}
	for i := range p.free {
		// Pop from the end hands out low ids first; that only makes logs easier to read.
		p.free[i] = ID(capacity - 1 - i)
	}
	p.counts[Free] = capacity
	return p, nil
}

// Capacity returns the number of blocks.
func (p *Pool) Capacity() int { return len(p.blocks) }

// BlockSize returns the size of one block in bytes.
func (p *Pool) BlockSize() int { return p.blockSize }

// Bytes returns the memory of block id. The caller must hold a reference or
// a pin on the block for as long as it uses the slice.
func (p *Pool) Bytes(id ID) []byte {
	off := int(id) * p.blockSize
	return p.slab[off : off+p.blockSize : off+p.blockSize]
}

// Offset returns the byte offset of block id in the slab.
func (p *Pool) Offset(id ID) uint64 { return uint64(id) * uint64(p.blockSize) }

// Allocate takes n FREE blocks, each with one reference, or none at all,
// evicting unreferenced cached blocks (least recently used first) when the
// free ones do not suffice. It never waits: a pool without n free or
// evictable blocks answers ErrExhausted at once, and a done ctx its error.
func (p *Pool) Allocate(ctx context.Context, n int) ([]ID, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if n <= 0 {
		return nil, fmt.Errorf("%w: allocate %d blocks", ErrBadBlock, n)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free)+p.lruLen < n {
		return nil, fmt.Errorf("%w: want %d, free %d, evictable %d of %d", ErrExhausted, n, len(p.free), p.lruLen, len(p.blocks))
	}
	for len(p.free) < n {
		p.evictLocked(ID(p.lruHead))
	}
	ids := make([]ID, n)
	copy(ids, p.free[len(p.free)-n:])
	p.free = p.free[:len(p.free)-n]
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.refs = 1 })
	}
	return ids, nil
}

// Ref adds one reference to each block. Every block must be OWNED or IN_FLIGHT.
func (p *Pool) Ref(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.refs > 0 }); err != nil {
		return err
	}
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.refs++ })
	}
	return nil
}

// Release drops one reference from each block. A block whose last reference
// goes and that no pin holds returns to FREE. This is the only way a block
// becomes FREE after allocation, apart from the reaper returning quarantined
// blocks (Unquarantine).
func (p *Pool) Release(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.refs > 0 }); err != nil {
		return err
	}
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.refs-- })
	}
	return nil
}

// Pin marks each block IN_FLIGHT for a transfer. Every block must hold a
// reference: a transfer works on behalf of a request.
func (p *Pool) Pin(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.refs > 0 && !b.quarantined && !b.poisoned }); err != nil {
		return err
	}
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.pins++ })
	}
	return nil
}

// Unpin ends a transfer's claim on each block; call it only once the transfer
// is proven quiescent. A block with no pins left becomes OWNED, or FREE if no
// reference remains.
func (p *Pool) Unpin(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.pins > 0 && !b.quarantined }); err != nil {
		return err
	}
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.pins-- })
	}
	return nil
}

// Quarantine moves pinned blocks whose quiescence is in doubt to QUARANTINED:
// the pin stays, the memory is out of circulation until Unquarantine (proof
// of quiescence) or Poison (the deadline passed).
func (p *Pool) Quarantine(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.pins > 0 && !b.quarantined && !b.poisoned }); err != nil {
		return err
	}
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.quarantined = true })
	}
	return nil
}

// Unquarantine returns quarantined blocks once quiescence is proven: the
// transfer's pin is dropped and the block goes to OWNED or FREE by its
// references.
func (p *Pool) Unquarantine(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.quarantined && !b.poisoned }); err != nil {
		return err
	}
	for _, id := range ids {
		p.transitionLocked(id, func(b *block) { b.quarantined = false; b.pins-- })
	}
	return nil
}

// Poison takes quarantined blocks out of circulation for good.
func (p *Pool) Poison(ids []ID) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked(ids, func(b *block) bool { return b.quarantined && !b.poisoned }); err != nil {
		return err
	}
	for _, id := range ids {
		// A poisoned block may have been written by a late transfer: it
		// must never be served from the cache again.
		p.transitionLocked(id, func(b *block) { b.poisoned = true; p.uncacheLocked(id) })
	}
	return nil
}

// Publish puts block id into the reuse cache under hash, the cache taking a
// reference of its own. It reports false, and changes nothing, when the hash
// is already cached (another request published the same prefix first) or
// the block is not OWNED by a request.
func (p *Pool) Publish(id ID, hash uint64) (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.checkLocked([]ID{id}, func(b *block) bool { return b.refs > 0 && !b.quarantined && !b.poisoned }); err != nil {
		return false, err
	}
	if _, dup := p.cache[hash]; dup || p.blocks[id].cached {
		return false, nil
	}
	p.cache[hash] = id
	p.transitionLocked(id, func(b *block) { b.cached, b.hash = true, hash; b.refs++ })
	return true, nil
}

// Lookup returns the cached blocks of the longest cached prefix of hashes,
// each with a new reference for the caller.
func (p *Pool) Lookup(hashes []uint64) []ID {
	p.mu.Lock()
	defer p.mu.Unlock()
	var ids []ID
	for _, h := range hashes {
		id, ok := p.cache[h]
		// A repeated hash is no chain; a quarantined block is out of
		// circulation until its transfer is proven quiet.
		if !ok || slices.Contains(ids, id) || p.blocks[id].quarantined {
			break
		}
		ids = append(ids, id)
		p.transitionLocked(id, func(b *block) { b.refs++ })
	}
	return ids
}

// CachedIDs returns the blocks in the reuse cache now.
func (p *Pool) CachedIDs() []ID {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make([]ID, 0, len(p.cache))
	for _, id := range p.cache {
		ids = append(ids, id)
	}
	return ids
}

// Available returns how many blocks an allocation could get now: the free
// ones and the evictable cached ones.
func (p *Pool) Available() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.free) + p.lruLen
}

// Freed returns a channel that is closed the next time a block becomes
// allocatable (FREE, or evictable from the reuse cache). Waiters re-check
// Available after it closes and ask again.
func (p *Pool) Freed() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.freed == nil {
		p.freed = make(chan struct{})
	}
	return p.freed
}

func (p *Pool) signalFreedLocked() {
	if p.freed != nil {
		close(p.freed)
		p.freed = nil
	}
}

// Cached returns the number of blocks in the reuse cache.
func (p *Pool) Cached() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.cache)
}

// evictLocked drops the cache's reference on an evictable block, which
// makes it FREE.
func (p *Pool) evictLocked(id ID) {
	b := &p.blocks[id]
	delete(p.cache, b.hash)
	p.transitionLocked(id, func(b *block) { b.cached = false; b.refs-- })
}

// uncacheLocked removes a block from the cache and drops the cache's
// reference, whatever else holds it.
func (p *Pool) uncacheLocked(id ID) {
	b := &p.blocks[id]
	if !b.cached {
		return
	}
	delete(p.cache, b.hash)
	b.cached = false
	b.refs--
}

// State returns the state of one block.
func (p *Pool) State(id ID) State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.blocks[id].state()
}

// ByState returns the number of blocks in each state, by the state's name
// (for gauges that must not depend on this package's types).
func (p *Pool) ByState() map[string]int {
	c := p.Counts()
	out := make(map[string]int, len(States()))
	for _, st := range States() {
		out[st.String()] = c.Of(st)
	}
	return out
}

// Counts returns the number of blocks in each state.
func (p *Pool) Counts() Counts {
	p.mu.Lock()
	defer p.mu.Unlock()
	return Counts{
		Capacity:    len(p.blocks),
		Free:        p.counts[Free],
		Owned:       p.counts[Owned],
		InFlight:    p.counts[InFlight],
		Quarantined: p.counts[Quarantined],
		Poisoned:    p.counts[Poisoned],
	}
}

// CheckInvariant recounts every block and compares with the maintained
// counts and the free list. Tests call it after every operation.
func (p *Pool) CheckInvariant() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var recount [numStates]int
	for i := range p.blocks {
		b := &p.blocks[i]
		if b.refs < 0 || b.pins < 0 {
			return fmt.Errorf("blockpool: block %d has refs %d pins %d", i, b.refs, b.pins)
		}
		recount[b.state()]++
	}
	sum := 0
	for s := range numStates {
		if recount[s] != p.counts[s] {
			return fmt.Errorf("blockpool: %s count %d, recount %d", s, p.counts[s], recount[s])
		}
		sum += recount[s]
	}
	if sum != len(p.blocks) {
		return fmt.Errorf("blockpool: states sum to %d, capacity %d", sum, len(p.blocks))
	}
	if len(p.free) != recount[Free] {
		return fmt.Errorf("blockpool: free list has %d blocks, %d are free", len(p.free), recount[Free])
	}
	for h, id := range p.cache {
		if b := &p.blocks[id]; !b.cached || b.hash != h || b.refs < 1 {
			return fmt.Errorf("blockpool: cache entry %#x -> block %d (cached %v, hash %#x, refs %d)", h, id, b.cached, b.hash, b.refs)
		}
	}
	linked, evictable := 0, 0
	for i := p.lruHead; i != noBlock; i = p.blocks[i].next {
		if !p.blocks[i].evictable() {
			return fmt.Errorf("blockpool: block %d in LRU but not evictable", i)
		}
		linked++
	}
	for i := range p.blocks {
		if p.blocks[i].evictable() {
			evictable++
		}
		if p.blocks[i].cached && p.cache[p.blocks[i].hash] != ID(i) {
			return fmt.Errorf("blockpool: block %d cached but not in the cache map", i)
		}
	}
	if linked != evictable || linked != p.lruLen {
		return fmt.Errorf("blockpool: LRU links %d, evictable %d, length %d", linked, evictable, p.lruLen)
	}
	return nil
}

// checkLocked validates every id before any is changed, so an operation
// applies to all blocks or to none.
func (p *Pool) checkLocked(ids []ID, ok func(*block) bool) error {
	for _, id := range ids {
		if int(id) >= len(p.blocks) {
			return fmt.Errorf("%w: block %d outside pool of %d", ErrBadBlock, id, len(p.blocks))
		}
		if !ok(&p.blocks[id]) {
			return fmt.Errorf("%w: block %d is %s", ErrBadBlock, id, p.blocks[id].state())
		}
	}
	// A repeated id would be changed twice by one call; only Ref/Release of
	// distinct references make sense, so reject duplicates.
	if len(ids) > 1 {
		seen := make(map[ID]struct{}, len(ids))
		for _, id := range ids {
			if _, dup := seen[id]; dup {
				return fmt.Errorf("%w: block %d repeated", ErrBadBlock, id)
			}
			seen[id] = struct{}{}
		}
	}
	return nil
}

// transitionLocked applies change to block id and keeps the counts, the
// free list and the LRU in step with the block's state.
func (p *Pool) transitionLocked(id ID, change func(*block)) {
	b := &p.blocks[id]
	before := b.state()
	change(b)
	after := b.state()
	switch ev := b.evictable(); {
	case ev && !b.inLRU:
		p.lruPushLocked(id)
		p.signalFreedLocked()
	case !ev && b.inLRU:
		p.lruRemoveLocked(id)
	}
	if before == after {
		return
	}
	p.counts[before]--
	p.counts[after]++
	if after == Free {
		p.free = append(p.free, id)
		p.signalFreedLocked()
	}
	// Leaving Free only happens in Allocate, which pops the free list itself.
}

// lruPushLocked links id as the most recently used.
func (p *Pool) lruPushLocked(id ID) {
	b := &p.blocks[id]
	b.inLRU, b.prev, b.next = true, p.lruTail, noBlock
	if p.lruTail != noBlock {
		p.blocks[p.lruTail].next = int32(id)
	} else {
		p.lruHead = int32(id)
	}
	p.lruTail = int32(id)
	p.lruLen++
}

func (p *Pool) lruRemoveLocked(id ID) {
	b := &p.blocks[id]
	if b.prev != noBlock {
		p.blocks[b.prev].next = b.next
	} else {
		p.lruHead = b.next
	}
	if b.next != noBlock {
		p.blocks[b.next].prev = b.prev
	} else {
		p.lruTail = b.prev
	}
	b.inLRU, b.prev, b.next = false, noBlock, noBlock
	p.lruLen--
}
