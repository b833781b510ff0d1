package executor

import "testing"

// FuzzStateDecode: bytes claimed to be a llama.cpp sequence state — from
// a buggy build or a hostile peer's blocks — never panic the parser or the
// converter, and never write outside the blocks.
func FuzzStateDecode(f *testing.F) {
	l := stateLayout{prefix: []byte{0xd8, 0x3c, 0x14, 0xaf, 0, 0, 0, 0}, nStream: 1, layers: 2, kType: 1, vType: 1, kRow: 8, vRow: 8}
	bl := l.blocks(4)
	for _, n := range []int{1, 3, 5} {
		blocks := make([][]byte, (n+3)/4)
		for i := range blocks {
			blocks[i] = make([]byte, bl.blockBytes())
		}
		f.Add(l.encodeState(blocks, bl, n), n)
	}
	f.Fuzz(func(t *testing.T, state []byte, n int) {
		if n < 1 || n > 64 {
			return
		}
		_, _ = probeLayout(state, n)
		blocks := make([][]byte, (n+3)/4)
		for i := range blocks {
			blocks[i] = make([]byte, bl.blockBytes())
		}
		if err := l.decodeState(state, blocks, bl, n, 0); err == nil {
			// Accepted: the rows it gave convert back to a state that
			// gives the same rows (the sequence ids in the header and the
			// cells, which llama.cpp discards, are not carried).
			again := make([][]byte, len(blocks))
			for i := range again {
				again[i] = make([]byte, bl.blockBytes())
			}
			if err := l.decodeState(l.encodeState(blocks, bl, n), again, bl, n, 0); err != nil {
				t.Fatalf("our own state refused: %v", err)
			}
			for i := range blocks {
				if string(blocks[i]) != string(again[i]) {
					t.Fatal("an accepted state does not round-trip")
				}
			}
		}
	})
}
