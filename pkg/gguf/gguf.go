// Package gguf reads the metadata of a GGUF file (llama.cpp's model
// format, version 3) and writes GGUF files: enough to make a model of a
// chosen shape with random weights and a donor model's tokenizer — a
// model whose KV cache is real in size and geometry, for measuring
// transfers and batching where no such model can be downloaded. The text
// it writes is noise; the compute and the KV are not.
package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// Magic is "GGUF" as a little-endian uint32; Version the one written.
const (
	Magic   uint32 = 0x46554747
	Version uint32 = 3
	// Alignment of tensor data (general.alignment's default).
	Alignment = 32
)

// Value types of metadata.
const (
	typeString  uint32 = 8
	typeArray   uint32 = 9
	typeUint32  uint32 = 4
	typeFloat32 uint32 = 6
)

// fixedSize is the encoded size of each fixed-size value type.
var fixedSize = map[uint32]int{0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

// Tensor types written (ggml's numbering).
const (
	F32 uint32 = 0
	F16 uint32 = 1
)

// maxString and maxArray bound what a reader accepts of a file: far above
// any real model's metadata (a vocabulary of 256k tokens), so a corrupt
// length cannot make it allocate without end.
const (
	maxString = 1 << 20
	maxArray  = 1 << 24
	maxKVs    = 1 << 16
)

// KV is one metadata entry; Raw is its value as encoded in the file.
type KV struct {
	Key  string
	Type uint32
	Raw  []byte
}

// String makes a string entry.
func String(key, v string) KV {
	return KV{Key: key, Type: typeString, Raw: append(binary.LittleEndian.AppendUint64(nil, uint64(len(v))), v...)}
}

// Uint32 makes a uint32 entry.
func Uint32(key string, v uint32) KV {
	return KV{Key: key, Type: typeUint32, Raw: binary.LittleEndian.AppendUint32(nil, v)}
}

// Float32 makes a float32 entry.
func Float32(key string, v float32) KV {
	return KV{Key: key, Type: typeFloat32, Raw: binary.LittleEndian.AppendUint32(nil, math.Float32bits(v))}
}

// ReadMetadata reads a GGUF file's header and metadata entries (not its
// tensors).
func ReadMetadata(r io.Reader) ([]KV, error) {
	br := bufio.NewReader(r)
	var hdr struct {
		Magic, Version uint32
		Tensors, KVs   uint64
	}
	if err := binary.Read(br, binary.LittleEndian, &hdr); err != nil {
		return nil, fmt.Errorf("gguf: header: %w", err)
	}
	switch {
	case hdr.Magic != Magic:
		return nil, errors.New("gguf: not a GGUF file")
	case hdr.Version != Version:
		return nil, fmt.Errorf("gguf: version %d, want %d", hdr.Version, Version)
	case hdr.KVs > maxKVs:
		return nil, fmt.Errorf("gguf: %d metadata entries", hdr.KVs)
	}
	kvs := make([]KV, 0, hdr.KVs)
	for range hdr.KVs {
		key, err := readString(br)
		if err != nil {
			return nil, err
		}
		var typ uint32
		if err := binary.Read(br, binary.LittleEndian, &typ); err != nil {
			return nil, fmt.Errorf("gguf: %s: %w", key, err)
		}
		var raw []byte
		if err := readValue(br, typ, &raw); err != nil {
			return nil, fmt.Errorf("gguf: %s: %w", key, err)
		}
		kvs = append(kvs, KV{Key: key, Type: typ, Raw: raw})
	}
	return kvs, nil
}

func readString(r io.Reader) (string, error) {
	var n uint64
	if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
		return "", fmt.Errorf("gguf: string length: %w", err)
	}
	if n > maxString {
		return "", fmt.Errorf("gguf: string of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return "", fmt.Errorf("gguf: string: %w", err)
	}
	return string(b), nil
}

// readValue appends one encoded value of type typ to *raw.
func readValue(r io.Reader, typ uint32, raw *[]byte) error {
	if n, ok := fixedSize[typ]; ok {
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return err
		}
		*raw = append(*raw, b...)
		return nil
	}
	switch typ {
	case typeString:
		s, err := readString(r)
		if err != nil {
			return err
		}
		*raw = append(binary.LittleEndian.AppendUint64(*raw, uint64(len(s))), s...)
		return nil
	case typeArray:
		var elem uint32
		var n uint64
		if err := binary.Read(r, binary.LittleEndian, &elem); err != nil {
			return err
		}
		if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
			return err
		}
		if n > maxArray || elem == typeArray {
			return fmt.Errorf("array of %d elements of type %d", n, elem)
		}
		*raw = binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint32(*raw, elem), n)
		for range n {
			if err := readValue(r, elem, raw); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("unknown value type %d", typ)
}

// Tensor is one tensor to write: its dimensions (ggml order: the first
// is the row length), its type (F32 or F16) and a function that fills its
// data, called once with a buffer of exactly its size.
type Tensor struct {
	Name string
	Dims []uint64
	Type uint32
	Fill func(data []byte)
}

// Bytes is the tensor's data size.
func (t Tensor) Bytes() uint64 {
	n := uint64(1)
	for _, d := range t.Dims {
		n *= d
	}
	if t.Type == F16 {
		return 2 * n
	}
	return 4 * n
}

func pad(n uint64) uint64 { return (n + Alignment - 1) / Alignment * Alignment }

// Write writes a GGUF file of kvs and tensors to w.
func Write(w io.Writer, kvs []KV, tensors []Tensor) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	var hdr []byte
	hdr = binary.LittleEndian.AppendUint32(hdr, Magic)
	hdr = binary.LittleEndian.AppendUint32(hdr, Version)
	hdr = binary.LittleEndian.AppendUint64(hdr, uint64(len(tensors)))
	hdr = binary.LittleEndian.AppendUint64(hdr, uint64(len(kvs)))
	for _, kv := range kvs {
		hdr = binary.LittleEndian.AppendUint64(hdr, uint64(len(kv.Key)))
		hdr = append(hdr, kv.Key...)
		hdr = binary.LittleEndian.AppendUint32(hdr, kv.Type)
		hdr = append(hdr, kv.Raw...)
	}
	var off uint64
	for _, t := range tensors {
		if t.Type != F32 && t.Type != F16 {
			return fmt.Errorf("gguf: %s: tensor type %d not written", t.Name, t.Type)
		}
		hdr = binary.LittleEndian.AppendUint64(hdr, uint64(len(t.Name)))
		hdr = append(hdr, t.Name...)
		hdr = binary.LittleEndian.AppendUint32(hdr, uint32(len(t.Dims)))
		for _, d := range t.Dims {
			hdr = binary.LittleEndian.AppendUint64(hdr, d)
		}
		hdr = binary.LittleEndian.AppendUint32(hdr, t.Type)
		hdr = binary.LittleEndian.AppendUint64(hdr, off)
		off = pad(off + t.Bytes())
	}
	hdr = append(hdr, make([]byte, pad(uint64(len(hdr)))-uint64(len(hdr)))...)
	if _, err := bw.Write(hdr); err != nil {
		return err
	}
	for _, t := range tensors {
		size := t.Bytes()
		buf := make([]byte, pad(size))
		t.Fill(buf[:size])
		if _, err := bw.Write(buf); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// Float16 is v as IEEE 754 half-precision bits, rounded to nearest even.
func Float16(v float32) uint16 {
	b := math.Float32bits(v)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23&0xff) - 127 + 15
	mant := b & 0x7fffff
	switch {
	case exp >= 0x1f: // overflow (or inf/nan): inf
		if b&0x7fffffff > 0x7f800000 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp <= 0: // subnormal or zero
		if exp < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint32(14 - exp)
		h := uint16(mant >> shift)
		if rem := mant & (1<<shift - 1); rem > 1<<(shift-1) || (rem == 1<<(shift-1) && h&1 == 1) {
			h++
		}
		return sign | h
	}
	h := sign | uint16(exp)<<10 | uint16(mant>>13)
	if rem := mant & 0x1fff; rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // a carry into the exponent is the right rounding too
	}
	return h
}
