// Command validate loads compose files the way `docker compose config` does, without a Docker
// engine: compose-go (the library the docker compose CLI uses) interpolates variables, validates
// against the Compose Specification schema, resolves extends/profiles and checks references
// (depends_on, volumes, networks). It prints the normalised model as YAML, or the error and exit 1.
//
//	go run . -f ../compose.yaml [--profile demo] [--profile conntrack]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var files, profiles list
	flag.Var(&files, "f", "compose file (repeatable)")
	flag.Var(&profiles, "profile", "profile to enable (repeatable)")
	flag.Parse()
	opts, err := cli.NewProjectOptions(files,
		cli.WithOsEnv, cli.WithDotEnv, cli.WithName("flowtally"), cli.WithProfiles(profiles),
		cli.WithConsistency(true), cli.WithResolvedPaths(true))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
