// Package buildinfo holds the version stamped in at link time.
package buildinfo

// Version and Commit are set with -ldflags -X by the Makefile and Dockerfile.
var (
	Version = "dev"
	Commit  = "unknown"
)
