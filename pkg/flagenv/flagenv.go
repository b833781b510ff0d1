// Package flagenv lets every flag --foo-bar also be set by the environment
// variable KVFERRY_FOO_BAR (the README's Configuration). A flag given on the command line wins.
package flagenv

import (
	"flag"
	"fmt"
	"strings"
)

// Prefix is the environment prefix of every kvferry flag.
const Prefix = "KVFERRY_"

// EnvName returns the environment variable that sets flag name.
func EnvName(name string) string {
	return Prefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// Apply sets every flag of fs that was not given on the command line from
// its environment variable, looked up with lookup (os.LookupEnv in main).
// Call it after fs.Parse.
func Apply(fs *flag.FlagSet, lookup func(string) (string, bool)) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] {
			return
		}
		v, ok := lookup(EnvName(f.Name))
		if !ok {
			return
		}
		if e := fs.Set(f.Name, v); e != nil {
			err = fmt.Errorf("invalid value %q for %s: %w", v, EnvName(f.Name), e)
		}
	})
	return err
}

// Usage returns a usage function for fs that names each flag's variable.
func Usage(fs *flag.FlagSet, what string) func() {
	return func() {
		out := fs.Output()
		fmt.Fprintf(out, "Usage of %s:\n", fs.Name())
		fmt.Fprintf(out, "%s\n\nEvery flag --foo-bar can also be set with the environment variable %sFOO_BAR; a flag wins.\n\n", what, Prefix)
		fs.VisitAll(func(f *flag.Flag) {
			fmt.Fprintf(out, "  --%s (env %s, default %q)\n    \t%s\n", f.Name, EnvName(f.Name), f.DefValue, f.Usage)
		})
	}
}
