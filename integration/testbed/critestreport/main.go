// Command critestreport turns critest runs into a conformance report and one summary line
// per handler. hack/critest.sh runs it; it reads, for each handler, the directory
// <results>/<handler>/ that critest.sh filled:
//
//	result.env   KEY=VALUE lines: status (ran | not-run), reason, wall_seconds, exit_code,
//	             date, commit, versions
//	junit.xml    critest's -ginkgo.junit-report (absent when critest did not run)
//	critest.log  critest's output; its "N Passed | N Failed" line is checked against junit.xml
//
// A handler that did not run, or whose critest left no report, is never counted as passing:
// its summary line says so and the exit status is 1.
package main

import (
	"bufio"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// junitSuites is the part of ginkgo v2's JUnit report this tool reads.
type junitSuites struct {
	Suites []struct {
		Cases []junitCase `xml:"testcase"`
	} `xml:"testsuite"`
}

type junitCase struct {
	Name    string  `xml:"name,attr"`
	Status  string  `xml:"status,attr"`
	Time    float64 `xml:"time,attr"`
	Failure *struct {
		Message string `xml:"message,attr"`
	} `xml:"failure"`
	Skipped *struct {
		Message string `xml:"message,attr"`
	} `xml:"skipped"`
}

// Spec is one critest spec's outcome on one handler.
type Spec struct {
	Outcome string // passed, failed or skipped
	Seconds float64
	Message string // why it failed or was skipped, on one line ("" when ginkgo gives no reason)
}

// Run is one handler's critest run (or the reason it did not run).
type Run struct {
	Handler string
	Meta    map[string]string
	Specs   map[string]Spec // by spec name
	Passed  int
	Failed  int
	Skipped int
	// Deviated counts the failed specs that are documented deviations (Deviations: spec →
	// reason); they are in Failed too.
	Deviated   int
	Deviations map[string]string
	Problem    string // why the run is not good: did not happen, counts disagree, undocumented failures vs the baseline; "" if fine
}

// outcome maps ginkgo's spec states onto the three columns critest prints.
func outcome(status string) string {
	switch status {
	case "passed":
		return "passed"
	case "skipped", "pending":
		return "skipped"
	default: // failed, panicked, interrupted, aborted, timedout
		return "failed"
	}
}

// parseJUnit reads the spec results; suite-level nodes ([BeforeSuite], [ReportAfterSuite]
// ...) are not specs and are left out, as ginkgo's own counts leave them out.
func parseJUnit(r io.Reader) (map[string]Spec, error) {
	var doc junitSuites
	if err := xml.NewDecoder(r).Decode(&doc); err != nil {
		return nil, fmt.Errorf("junit: %w", err)
	}
	specs := map[string]Spec{}
	for _, s := range doc.Suites {
		for _, c := range s.Cases {
			name, ok := strings.CutPrefix(c.Name, "[It] ")
			if !ok {
				continue
			}
			sp := Spec{Outcome: outcome(c.Status), Seconds: c.Time}
			switch {
			case sp.Outcome == "failed" && c.Failure != nil:
				sp.Message = oneLine(c.Failure.Message)
			case sp.Outcome == "skipped" && c.Skipped != nil:
				// "skipped - AppArmor is disabled on this host"; a -ginkgo.skip gives just "skipped"
				sp.Message = strings.TrimPrefix(oneLine(c.Skipped.Message), "skipped")
				sp.Message = strings.TrimSpace(strings.TrimPrefix(sp.Message, " -"))
			}
			specs[strings.TrimSpace(name)] = sp
		}
	}
	return specs, nil
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

var ginkgoSummary = regexp.MustCompile(`(?m)^(?:SUCCESS!|FAIL!).*?(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped`)

// logCounts returns ginkgo's own passed/failed/skipped counts from critest's output.
func logCounts(log string) (passed, failed, skipped int, ok bool) {
	m := ginkgoSummary.FindStringSubmatch(log)
	if m == nil {
		return 0, 0, 0, false
	}
	n := make([]int, 4)
	for i := range n {
		n[i], _ = strconv.Atoi(m[i+1])
	}
	return n[0], n[1], n[2] + n[3], true
}

func readMeta(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	meta := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			meta[k] = v
		}
	}
	return meta, sc.Err()
}

// loadRun reads <dir>/<handler>. A missing directory is a run that never happened.
func loadRun(dir, handler string) Run {
	run := Run{Handler: handler, Specs: map[string]Spec{}}
	d := filepath.Join(dir, handler)
	meta, err := readMeta(filepath.Join(d, "result.env"))
	if err != nil {
		run.Problem = "no result: critest was never run for this handler"
		run.Meta = map[string]string{}
		return run
	}
	run.Meta = meta
	if meta["status"] != "ran" {
		run.Problem = "NOT RUN: " + meta["reason"]
		return run
	}
	f, err := os.Open(filepath.Join(d, "junit.xml"))
	if err != nil {
		run.Problem = fmt.Sprintf("critest exited %s without a junit report (see %s)", meta["exit_code"], filepath.Join(d, "critest.log"))
		return run
	}
	defer f.Close()
	if run.Specs, err = parseJUnit(f); err != nil {
		run.Problem = err.Error()
		return run
	}
	for _, s := range run.Specs {
		switch s.Outcome {
		case "passed":
			run.Passed++
		case "failed":
			run.Failed++
		default:
			run.Skipped++
		}
	}
	// ginkgo's summary line and the junit report must agree, or one of them is misread
	if log, err := os.ReadFile(filepath.Join(d, "critest.log")); err == nil {
		p, fl, s, ok := logCounts(string(log))
		switch {
		case !ok:
			run.Problem = "critest.log has no ginkgo summary line (critest interrupted?)"
		case p != run.Passed || fl != run.Failed || s != run.Skipped:
			run.Problem = fmt.Sprintf("junit counts %d/%d/%d differ from critest's %d/%d/%d",
				run.Passed, run.Failed, run.Skipped, p, fl, s)
		}
	}
	if run.Problem == "" && meta["exit_code"] != "0" && run.Failed == 0 {
		run.Problem = "critest exited " + meta["exit_code"] + " with no failed spec"
	}
	return run
}

// OK says whether the run happened and every spec that ran passed, but for documented
// deviations.
func (r Run) OK() bool { return r.Problem == "" && r.Failed == r.Deviated && r.Passed > 0 }

// SummaryLine is the line critest.sh ends with, one per handler.
func (r Run) SummaryLine() string {
	line := fmt.Sprintf("critest[%s]: %d passed, %d failed, %d skipped", r.Handler, r.Passed, r.Failed, r.Skipped)
	if r.Deviated > 0 {
		line += fmt.Sprintf(" (%d of the failed are documented deviations, design/007)", r.Deviated)
	}
	if w := r.Meta["wall_seconds"]; w != "" && r.Meta["status"] == "ran" {
		line += " in " + w + "s wall"
	}
	if a := r.Meta["critest_args"]; a != "" {
		line += " (critest " + a + ")"
	}
	if r.Problem != "" {
		line += " -- " + r.Problem
	}
	return line
}

func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ", "<", "&lt;", ">", "&gt;").Replace(s)
}

func cell(r Run, name string) string {
	s, ok := r.Specs[name]
	switch {
	case !ok:
		return "–"
	case s.Outcome == "skipped" && s.Message != "":
		return "skipped: " + mdEscape(s.Message)
	case s.Outcome == "skipped":
		return "skipped"
	case s.Outcome == "failed" && r.Deviations[name] != "":
		return fmt.Sprintf("deviation (failed) %.1f s", s.Seconds)
	case s.Outcome == "failed":
		return fmt.Sprintf("**FAILED** %.1f s", s.Seconds)
	default:
		return fmt.Sprintf("passed %.1f s", s.Seconds)
	}
}

// Render writes the conformance report (published as docs/conformance.md).
func Render(w io.Writer, runs []Run, skip string) {
	fmt.Fprintf(w, "# CRI conformance: critest per runtime handler\n\n")
	fmt.Fprintf(w, "Generated by `hack/critest.sh` (do not edit): critest %s against the test bed's private containerd "+
		"([design](design/300-test-bed.md)), one run per handler. Skipped on purpose: `%s` (its image is an upstream digest, "+
		"impossible offline). The other skips are critest's own: benchmarks, and AppArmor specs on hosts without AppArmor.\n\n",
		firstMeta(runs, "critest_version"), mdEscape(skip))
	fmt.Fprintln(w, "| handler | passed | failed | skipped | critest wall time | run |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---|")
	for _, r := range runs {
		if r.Meta["status"] != "ran" {
			fmt.Fprintf(w, "| %s | – | – | – | – | %s |\n", r.Handler, mdEscape(r.Problem))
			continue
		}
		run := fmt.Sprintf("%s, commit %s; containerd %s, runc %s", r.Meta["date"], r.Meta["commit"],
			r.Meta["containerd_version"], r.Meta["runc_version"])
		if r.Meta["shim"] != "" {
			run += "; shim " + r.Meta["shim"]
		}
		if r.Meta["critest_args"] != "" {
			run += "; **partial run**: critest " + r.Meta["critest_args"]
		}
		if r.Problem != "" {
			run += "; **" + r.Problem + "**"
		}
		fmt.Fprintf(w, "| %s | %d | %d | %d | %s s | %s |\n", r.Handler, r.Passed, r.Failed, r.Skipped,
			r.Meta["wall_seconds"], mdEscape(run))
	}

	for _, r := range runs {
		var failed, deviated []string
		for name, s := range r.Specs {
			if s.Outcome != "failed" {
				continue
			}
			if reason := r.Deviations[name]; reason != "" {
				deviated = append(deviated, fmt.Sprintf("- %s  \n  %s", mdEscape(name), mdEscape(reason)))
				continue
			}
			failed = append(failed, fmt.Sprintf("- %s  \n  `%s`", mdEscape(name), strings.ReplaceAll(trunc(s.Message, 300), "`", "'")))
		}
		if len(deviated) > 0 {
			sort.Strings(deviated)
			fmt.Fprintf(w, "\n## Documented deviations: %s (%d of at most %d)\n\nSpecs this handler fails by design; "+
				"the reasoning is in [design/007](design/007-conformance-deviations.md).\n\n%s\n",
				r.Handler, len(deviated), MaxDeviations, strings.Join(deviated, "\n"))
		}
		if len(failed) > 0 {
			sort.Strings(failed)
			fmt.Fprintf(w, "\n## Failures: %s\n\n%s\n", r.Handler, strings.Join(failed, "\n"))
		}
	}

	names := map[string]bool{}
	for _, r := range runs {
		for n := range r.Specs {
			names[n] = true
		}
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	fmt.Fprintf(w, "\n## Per spec (%d specs)\n\n| spec |", len(sorted))
	for _, r := range runs {
		fmt.Fprintf(w, " %s |", r.Handler)
	}
	fmt.Fprint(w, "\n|---|")
	for range runs {
		fmt.Fprint(w, "---|")
	}
	fmt.Fprintln(w)
	for _, n := range sorted {
		fmt.Fprintf(w, "| %s |", mdEscape(n))
		for _, r := range runs {
			fmt.Fprintf(w, " %s |", cell(r, n))
		}
		fmt.Fprintln(w)
	}
}

func firstMeta(runs []Run, key string) string {
	for _, r := range runs {
		if v := r.Meta[key]; v != "" {
			return v
		}
	}
	return "(unknown version)"
}

func trunc(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func main() {
	results := flag.String("results", "_output/critest", "directory with one subdirectory per handler")
	handlers := flag.String("handlers", "runc,vmpod", "handlers to show in the document, in column order")
	summary := flag.String("summary", "", "handlers to print a summary line for (default: all of -handlers)")
	out := flag.String("out", "_output/critest/conformance.md", "report to write")
	skip := flag.String("skip", "", "the -ginkgo.skip critest.sh passed, for the document")
	deviationsFile := flag.String("deviations", "", "documented deviations: lines \"handler | spec | reason\"")
	baseline := flag.String("baseline", "runc", "handler whose passed specs every other handler must pass or document")
	flag.Parse()
	deviations, err := loadDeviations(*deviationsFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "critestreport: deviations:", err)
		os.Exit(2)
	}
	allOK, err := run(*results, *handlers, *summary, *out, *skip, deviations, *baseline, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "critestreport:", err)
		os.Exit(2)
	}
	if !allOK {
		os.Exit(1)
	}
}

// run writes the document and the summary lines; allOK is false unless every summarized
// handler ran and passed.
func run(results, handlers, summary, out, skip string, deviations []Deviation, baseline string, stdout io.Writer) (allOK bool, err error) {
	var runs []Run
	byName := map[string]Run{}
	load := func(h string) Run {
		r := loadRun(results, h)
		applyDeviations(&r, deviations)
		return r
	}
	for _, h := range strings.Split(handlers, ",") {
		runs = append(runs, load(h))
	}
	if baseline != "" {
		base := load(baseline)
		for i := range runs {
			compareToBaseline(&runs[i], base)
		}
	}
	for _, r := range runs {
		byName[r.Handler] = r
	}
	var doc strings.Builder
	Render(&doc, runs, skip)
	if err := os.WriteFile(out, []byte(doc.String()), 0o644); err != nil {
		return false, err
	}
	if summary == "" {
		summary = handlers
	}
	allOK = true
	for _, h := range strings.Split(summary, ",") {
		r, ok := byName[h]
		if !ok {
			r = load(h)
		}
		fmt.Fprintln(stdout, r.SummaryLine())
		allOK = allOK && r.OK()
	}
	return allOK, nil
}
