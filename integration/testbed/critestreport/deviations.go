package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
)

// MaxDeviations bounds the documented deviations per handler (the conformance bar).
const MaxDeviations = 5

// Deviation is a critest spec a handler fails by design, with the reason; the long form
// is in docs/design/007-conformance-deviations.md.
type Deviation struct {
	Handler string
	Spec    string // the spec's full name as critest reports it
	Reason  string
}

// readDeviations parses lines "handler | spec | reason"; # starts a comment.
func readDeviations(r io.Reader) ([]Deviation, error) {
	var out []Deviation
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, "|")
		if len(f) != 3 {
			return nil, fmt.Errorf("line %d: want \"handler | spec | reason\", got %q", n, line)
		}
		d := Deviation{strings.TrimSpace(f[0]), strings.TrimSpace(f[1]), strings.TrimSpace(f[2])}
		if d.Handler == "" || d.Spec == "" || d.Reason == "" {
			return nil, fmt.Errorf("line %d: empty field", n)
		}
		out = append(out, d)
	}
	return out, sc.Err()
}

func loadDeviations(path string) ([]Deviation, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readDeviations(f)
}

// applyDeviations marks r's failed specs that are documented deviations of its handler,
// and records problems: too many deviations, or a deviation that no longer fails (the
// list must shrink with the code).
func applyDeviations(r *Run, all []Deviation) {
	var mine []Deviation
	for _, d := range all {
		if d.Handler == r.Handler {
			mine = append(mine, d)
		}
	}
	if len(mine) == 0 {
		return
	}
	r.Deviations = map[string]string{}
	if len(mine) > MaxDeviations {
		r.addProblem(fmt.Sprintf("%d documented deviations, at most %d allowed", len(mine), MaxDeviations))
	}
	for _, d := range mine {
		s, ok := r.Specs[d.Spec]
		switch {
		case !ok:
			if r.Meta["critest_args"] == "" { // a focused run does not run every spec
				r.addProblem("documented deviation not among the specs: " + d.Spec)
			}
		case s.Outcome == "failed":
			r.Deviations[d.Spec] = d.Reason
			r.Deviated++
		case s.Outcome == "passed":
			r.addProblem("documented deviation passes now, remove it from the list: " + d.Spec)
		}
	}
}

func (r *Run) addProblem(p string) {
	if r.Problem != "" {
		r.Problem += "; "
	}
	r.Problem += p
}

// compareToBaseline: every spec the baseline handler (runc) passes, the handler must pass
// too, unless it is a documented deviation.
func compareToBaseline(r *Run, baseline Run) {
	if baseline.Meta["status"] != "ran" || r.Meta["status"] != "ran" || r.Handler == baseline.Handler {
		return
	}
	var missing []string
	for name, s := range baseline.Specs {
		if s.Outcome != "passed" {
			continue
		}
		mine, ok := r.Specs[name]
		if ok && (mine.Outcome == "passed" || r.Deviations[name] != "") {
			continue
		}
		if !ok && r.Meta["critest_args"] != "" {
			continue // not in a focused run
		}
		missing = append(missing, name)
	}
	if len(missing) > 0 {
		r.addProblem(fmt.Sprintf("%d specs %s passes are neither passed nor documented deviations (first: %s)",
			len(missing), baseline.Handler, missing[0]))
	}
}
