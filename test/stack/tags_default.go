//go:build !ucx

package stack

// buildTags are the tags the server binaries are built with.
const buildTags = ""
