package executor

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// stateLayout is how this llama.cpp build writes one sequence's KV state
// (llama_state_seq_get_data), learned at start by parsing a real export
// (see probeLayout). The wire never carries this format: blocks carry token
// rows (blockLayout), and each side rebuilds the state with its own build's
// layout.
//
// The state of one sequence, as written by llama_kv_cache::state_write:
//
//	prefix (this build: u32 magic, u32 the exporting sequence id; the
//	        probe exports sequence 0, so rebuilt states read as exported from
//	        it — llama.cpp loads them into any destination sequence)
//	u32 n_stream
//	per stream: u32 cell_count, then (when cell_count > 0; one stream only)
//	  per cell:  i32 pos, u32 n_seq_id (=1), i32 seq_id
//	  u32 v_trans, u32 n_layer
//	  per layer: i32 k_type, u64 k_row_bytes, cell_count K rows
//	  per layer, V not transposed: i32 v_type, u64 v_row_bytes, cell_count V rows
//	  per layer, V transposed:     i32 v_type, u32 v_el_bytes, u32 n_embd_v,
//	                               n_embd_v runs of cell_count elements
type stateLayout struct {
	prefix  []byte
	nStream uint32
	vTrans  bool
	layers  int
	kType   int32
	vType   int32
	kRow    int // bytes of one token's K row in one layer
	vRow    int // bytes of one token's V row in one layer
	vEl     int // bytes of one V element (used when vTrans)
}

// blockLayout places token rows in kvferry's blocks: block i holds tokens
// [i·B, (i+1)·B); inside a block, for every layer, the B tokens' K rows and
// then their V rows — the paged layout vLLM and TensorRT-LLM use.
type blockLayout struct {
	tokens int // B
	layers int
	kRow   int
	vRow   int
}

func (b blockLayout) bytesPerToken() int { return b.layers * (b.kRow + b.vRow) }
func (b blockLayout) blockBytes() int    { return b.tokens * b.bytesPerToken() }

// kOff and vOff are the offsets of token t's K and V rows of layer l inside
// its block.
func (b blockLayout) kOff(l, t int) int {
	return l*b.tokens*(b.kRow+b.vRow) + (t%b.tokens)*b.kRow
}

func (b blockLayout) vOff(l, t int) int {
	return l*b.tokens*(b.kRow+b.vRow) + b.tokens*b.kRow + (t%b.tokens)*b.vRow
}

func (s stateLayout) blocks(tokens int) blockLayout {
	return blockLayout{tokens: tokens, layers: s.layers, kRow: s.kRow, vRow: s.vRow}
}

// errState reports a state that does not have the learned layout.
var errState = errors.New("executor: llama.cpp sequence state")

type stateReader struct {
	b   []byte
	off int
	err error
}

func (r *stateReader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || r.off+n > len(r.b) {
		r.err = fmt.Errorf("%w: truncated at byte %d (need %d more, have %d)", errState, r.off, n, len(r.b)-r.off)
		return nil
	}
	out := r.b[r.off : r.off+n]
	r.off += n
	return out
}

func (r *stateReader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *stateReader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

// probeLayout learns the layout from a real export of a sequence holding
// cells tokens at positions 0..cells-1. prefixLen is the number of bytes
// before the stream count.
func probeLayout(state []byte, cells int) (stateLayout, error) {
	// The prefix is what precedes the stream count; find it as the offset
	// where (n_stream, cell_count, pos 0, n_seq_id 1) reads consistently.
	for p := 0; p+16 <= len(state) && p <= 64; p += 4 {
		nStream := binary.LittleEndian.Uint32(state[p:])
		if nStream == 0 || nStream > 1024 {
			continue
		}
		l, _, err := parseLayout(state, p, nStream, cells)
		if err == nil {
			return l, nil
		}
	}
	return stateLayout{}, fmt.Errorf("%w: could not learn the layout of a %d-byte export of %d tokens", errState, len(state), cells)
}

// parseLayout reads a state of cells tokens whose stream count starts at
// byte prefix. The sequence's cells sit in one stream (the exporting
// sequence's own when the cache is not unified); every other stream is
// empty. It returns the layout and the offset of the v_trans word.
func parseLayout(state []byte, prefix int, nStream uint32, cells int) (stateLayout, int, error) {
	if len(state) < prefix+4 || binary.LittleEndian.Uint32(state[prefix:]) != nStream {
		return stateLayout{}, 0, fmt.Errorf("%w: no stream count of %d after a %d-byte header", errState, nStream, prefix)
	}
	r := &stateReader{b: state, off: prefix + 4}
	l := stateLayout{prefix: append([]byte(nil), state[:prefix]...), nStream: nStream}
	dataOff := -1
	for s := uint32(0); s < nStream; s++ {
		n := r.u32()
		if r.err != nil {
			return l, 0, r.err
		}
		if n == 0 {
			continue
		}
		if dataOff >= 0 || int(n) != cells {
			return l, 0, fmt.Errorf("%w: stream %d holds %d cells, want one stream of %d", errState, s, n, cells)
		}
		for i := range cells {
			pos, nSeq, _ := r.u32(), r.u32(), r.u32()
			if int(pos) != i || nSeq != 1 {
				return l, 0, fmt.Errorf("%w: cell %d has pos %d and %d sequence ids", errState, i, pos, nSeq)
			}
		}
		dataOff = r.off
		if err := l.readData(r, cells); err != nil {
			return l, 0, err
		}
	}
	if r.err != nil {
		return l, 0, r.err
	}
	if dataOff < 0 {
		return l, 0, fmt.Errorf("%w: no stream holds the sequence", errState)
	}
	if r.off != len(state) {
		return l, 0, fmt.Errorf("%w: %d trailing bytes", errState, len(state)-r.off)
	}
	return l, dataOff, nil
}

// readData reads the K and V sections of cells tokens into l's geometry.
func (l *stateLayout) readData(r *stateReader, cells int) error {
	vt, layers := r.u32(), r.u32()
	if vt > 1 || layers == 0 || layers > 4096 {
		return fmt.Errorf("%w: v_trans %d, %d layers", errState, vt, layers)
	}
	l.vTrans, l.layers = vt == 1, int(layers)
	for i := range l.layers {
		t, row := int32(r.u32()), r.u64()
		if i == 0 {
			l.kType, l.kRow = t, int(row)
		} else if t != l.kType || int(row) != l.kRow {
			return fmt.Errorf("%w: layer %d K has type %d and %d-byte rows, layer 0 %d and %d (per-layer geometry is not supported)", errState, i, t, row, l.kType, l.kRow)
		}
		r.take(cells * l.kRow)
	}
	for i := range l.layers {
		t := int32(r.u32())
		var row, el int
		if l.vTrans {
			el = int(r.u32())
			row = el * int(r.u32())
		} else {
			row = int(r.u64())
		}
		if i == 0 {
			l.vType, l.vRow, l.vEl = t, row, el
		} else if t != l.vType || row != l.vRow || el != l.vEl {
			return fmt.Errorf("%w: layer %d V geometry differs from layer 0 (per-layer geometry is not supported)", errState, i)
		}
		r.take(cells * l.vRow)
	}
	if r.err != nil {
		return r.err
	}
	if l.kRow == 0 || l.vRow == 0 {
		return fmt.Errorf("%w: empty K or V rows", errState)
	}
	return nil
}

// stateSize is the size of the state of n tokens.
func (s stateLayout) stateSize(n int) int {
	meta := 4 + n*12 + 8 + s.layers*(12+n*s.kRow) + s.layers*(12+n*s.vRow)
	return len(s.prefix) + 4 + meta + 4*int(s.nStream-1)
}

// encodeState builds the state of tokens [0, n) from the token rows in
// blocks, in this build's layout, ready for llama_state_seq_set_data. The
// cells go in the first stream: llama.cpp reads them into the destination
// sequence's own stream whichever slot carries them.
func (s stateLayout) encodeState(blocks [][]byte, bl blockLayout, n int) []byte {
	out := make([]byte, 0, s.stateSize(n))
	le := binary.LittleEndian
	out = append(out, s.prefix...)
	out = le.AppendUint32(out, s.nStream)
	out = le.AppendUint32(out, uint32(n))
	for i := range n {
		out = le.AppendUint32(out, uint32(i))
		out = le.AppendUint32(out, 1)
		out = le.AppendUint32(out, 0)
	}
	vt := uint32(0)
	if s.vTrans {
		vt = 1
	}
	out = le.AppendUint32(out, vt)
	out = le.AppendUint32(out, uint32(s.layers))
	for l := range s.layers {
		out = le.AppendUint32(out, uint32(s.kType))
		out = le.AppendUint64(out, uint64(s.kRow))
		for t := range n {
			o := bl.kOff(l, t)
			out = append(out, blocks[t/bl.tokens][o:o+s.kRow]...)
		}
	}
	for l := range s.layers {
		out = le.AppendUint32(out, uint32(s.vType))
		if !s.vTrans {
			out = le.AppendUint64(out, uint64(s.vRow))
			for t := range n {
				o := bl.vOff(l, t)
				out = append(out, blocks[t/bl.tokens][o:o+s.vRow]...)
			}
			continue
		}
		out = le.AppendUint32(out, uint32(s.vEl))
		out = le.AppendUint32(out, uint32(s.vRow/s.vEl))
		for j := 0; j < s.vRow; j += s.vEl {
			for t := range n {
				o := bl.vOff(l, t) + j
				out = append(out, blocks[t/bl.tokens][o:o+s.vEl]...)
			}
		}
	}
	for range s.nStream - 1 {
		out = le.AppendUint32(out, 0)
	}
	return out
}

// decodeState writes the token rows of tokens [from, n) of a state of n
// tokens into blocks; rows of tokens before from are left as they are
// (they are prefix-reuse blocks, read and never written), and the tail of
// the last block past n is zeroed.
func (s stateLayout) decodeState(state []byte, blocks [][]byte, bl blockLayout, n, from int) error {
	if len(state) != s.stateSize(n) {
		return fmt.Errorf("%w: %d bytes for %d tokens, want %d", errState, len(state), n, s.stateSize(n))
	}
	got, dataOff, err := parseLayout(state, len(s.prefix), s.nStream, n)
	if err != nil {
		return err
	}
	if got.vTrans != s.vTrans || got.kRow != s.kRow || got.vRow != s.vRow || got.layers != s.layers || got.kType != s.kType || got.vType != s.vType {
		return fmt.Errorf("%w: export does not have the learned layout", errState)
	}
	off := dataOff + 8
	for l := range s.layers {
		off += 12
		for t := range n {
			if t >= from {
				o := bl.kOff(l, t)
				copy(blocks[t/bl.tokens][o:o+s.kRow], state[off:off+s.kRow])
			}
			off += s.kRow
		}
	}
	for l := range s.layers {
		off += 12
		if !s.vTrans {
			for t := range n {
				if t >= from {
					o := bl.vOff(l, t)
					copy(blocks[t/bl.tokens][o:o+s.vRow], state[off:off+s.vRow])
				}
				off += s.vRow
			}
			continue
		}
		for j := 0; j < s.vRow; j += s.vEl {
			for t := range n {
				if t >= from {
					o := bl.vOff(l, t) + j
					copy(blocks[t/bl.tokens][o:o+s.vEl], state[off:off+s.vEl])
				}
				off += s.vEl
			}
		}
	}
	if rem := n % bl.tokens; rem != 0 {
		last := blocks[(n-1)/bl.tokens]
		for l := range s.layers {
			clear(last[bl.kOff(l, rem) : bl.kOff(l, 0)+bl.tokens*s.kRow])
			clear(last[bl.vOff(l, rem) : bl.vOff(l, 0)+bl.tokens*s.vRow])
		}
	}
	return nil
}
