// testsummary reads `go test -json` streams and prints what CI ends with: per-package
// counts, every skipped test with its reason, every failed test, and one total line.
// Extra result lines (e.g. critest's) given with -extra are printed before the total;
// one starting with FAIL fails the run. It exits 1 if any test failed or any package
// failed to build.
//
//	go test -json ./... | testsummary -record go-test.json   # progress while it runs
//	testsummary [-extra critest.txt] go-test.json [more.json...]
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (test2json).
type event struct {
	Action     string
	Package    string
	ImportPath string // build-output events name the package here
	Test       string
	Output     string
	Elapsed    float64
}

type pkgResult struct {
	pass, fail, skip int
	elapsed          float64
	buildFailed      bool
	output           []string // package-level output, shown when the package failed
}

type testKey struct{ pkg, test string }

type summary struct {
	pkgs     map[string]*pkgResult
	output   map[testKey][]string // per-test output, kept for skip reasons and failures
	skipped  []testKey
	failed   []testKey
	started  time.Time
	finished time.Time
}

func newSummary() *summary {
	return &summary{pkgs: map[string]*pkgResult{}, output: map[testKey][]string{}}
}

func (s *summary) pkg(name string) *pkgResult {
	p, ok := s.pkgs[name]
	if !ok {
		p = &pkgResult{}
		s.pkgs[name] = p
	}
	return p
}

func (s *summary) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			// Build errors are printed as plain text between the JSON lines.
			if text := strings.TrimSpace(string(line)); text != "" {
				p := s.pkg("(build)")
				p.output = append(p.output, text)
			}
			continue
		}
		s.add(e)
	}
	return sc.Err()
}

func (s *summary) add(e event) {
	if e.Action == "build-output" {
		p := s.pkg("(build)")
		p.output = append(p.output, strings.TrimRight(e.Output, "\n"))
		return
	}
	p := s.pkg(e.Package)
	key := testKey{e.Package, e.Test}
	switch {
	case e.Action == "output" && e.Test != "":
		s.output[key] = append(s.output[key], e.Output)
	case e.Action == "output":
		p.output = append(p.output, strings.TrimRight(e.Output, "\n"))
	case e.Test == "" && e.Action == "fail":
		p.elapsed = e.Elapsed
		if p.pass+p.fail+p.skip == 0 {
			p.buildFailed = true
		}
	case e.Test == "" && (e.Action == "pass" || e.Action == "skip"):
		p.elapsed = e.Elapsed
	case e.Action == "pass":
		p.pass++
	case e.Action == "fail":
		p.fail++
		s.failed = append(s.failed, key)
	case e.Action == "skip":
		p.skip++
		s.skipped = append(s.skipped, key)
	}
}

// skipReason is the t.Skip message: the test's last output line that is not the
// "--- SKIP" marker.
func (s *summary) skipReason(k testKey) string {
	lines := s.output[k]
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if l == "" || strings.HasPrefix(l, "--- SKIP") || strings.HasPrefix(l, "=== ") {
			continue
		}
		// "file_test.go:12: reason"
		if _, after, ok := strings.Cut(l, ": "); ok && strings.Contains(l[:len(l)-len(after)], ".go:") {
			return after
		}
		return l
	}
	return "(no reason given)"
}

// Failure output kept per failed test: CI shows only the end of a run, where the
// summary is, so the reason must be there too.
const (
	failureMaxLines   = 15
	failureMaxLineLen = 400
)

// failureLines is what a failed test said: its t.Error/t.Fatal/t.Log lines ("x_test.go:12:
// ..."), the last failureMaxLines of them, else the end of its output. The long dumps a
// test logs (a VM's console) are continuation lines and stay out.
func (s *summary) failureLines(k testKey) []string {
	var said, all []string
	for _, l := range s.output[k] {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- ") {
			continue
		}
		if len(t) > failureMaxLineLen {
			t = t[:failureMaxLineLen] + " […]"
		}
		all = append(all, t)
		if goSourcePrefix.MatchString(t) {
			said = append(said, t)
		}
	}
	lines := all
	if len(said) > 0 {
		lines = said
	}
	if len(lines) > failureMaxLines {
		lines = append([]string{"[…]"}, lines[len(lines)-failureMaxLines:]...)
	}
	return lines
}

// goSourcePrefix starts a line a test printed through testing.T: "name.go:123: ".
var goSourcePrefix = regexp.MustCompile(`^[\w.-]+\.go:[0-9]+: `)

func shortPkg(p string) string { return strings.TrimPrefix(p, "github.com/vmpod/vmpod/") }

func (s *summary) print(w io.Writer, extra []string) (failed bool) {
	names := make([]string, 0, len(s.pkgs))
	for n := range s.pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	var pass, fail, skip, buildFail int
	fmt.Fprintln(w, "== test summary ==")
	fmt.Fprintf(w, "%-52s %5s %5s %5s %8s\n", "package", "pass", "fail", "skip", "time")
	for _, n := range names {
		p := s.pkgs[n]
		if n == "(build)" {
			continue
		}
		if p.pass+p.fail+p.skip == 0 && !p.buildFailed {
			continue // no tests
		}
		status := ""
		if p.buildFailed {
			status = "  BUILD FAILED"
			buildFail++
		}
		fmt.Fprintf(w, "%-52s %5d %5d %5d %7.1fs%s\n", shortPkg(n), p.pass, p.fail, p.skip, p.elapsed, status)
		pass, fail, skip = pass+p.pass, fail+p.fail, skip+p.skip
	}
	if len(s.skipped) > 0 {
		fmt.Fprintf(w, "\nskipped (%d):\n", len(s.skipped))
		for _, k := range s.skipped {
			fmt.Fprintf(w, "  %s %s: %s\n", shortPkg(k.pkg), k.test, s.skipReason(k))
		}
	}
	if len(s.failed) > 0 {
		fmt.Fprintf(w, "\nfailed (%d):\n", len(s.failed))
		for _, k := range s.failed {
			fmt.Fprintf(w, "  %s %s\n", shortPkg(k.pkg), k.test)
			for _, l := range s.failureLines(k) {
				fmt.Fprintf(w, "      %s\n", l)
			}
		}
	}
	for _, n := range names {
		if p := s.pkgs[n]; p.buildFailed || (n == "(build)" && len(p.output) > 0) {
			fmt.Fprintf(w, "\n%s output:\n  %s\n", shortPkg(n), strings.Join(p.output, "\n  "))
		}
	}
	fmt.Fprintln(w)
	for _, l := range extra {
		fmt.Fprintln(w, l)
	}
	fmt.Fprintf(w, "go test: %d passed, %d failed, %d skipped", pass, fail, skip)
	if buildFail > 0 {
		fmt.Fprintf(w, ", %d packages failed to build", buildFail)
	}
	fmt.Fprintln(w)
	return fail > 0 || buildFail > 0
}

// record copies a live `go test -json` stream from r to path and prints a line per
// finished package, so a long run shows progress.
func record(r io.Reader, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if _, err := f.Write(append(line, '\n')); err != nil {
			return err
		}
		var e event
		if json.Unmarshal(line, &e) != nil {
			continue
		}
		switch {
		case e.Test == "" && e.Package != "" && (e.Action == "pass" || e.Action == "fail"):
			fmt.Printf("%s %s %.1fs\n", strings.ToUpper(e.Action), shortPkg(e.Package), e.Elapsed)
		case e.Test != "" && e.Action == "fail":
			fmt.Printf("  FAIL %s %s\n", shortPkg(e.Package), e.Test)
		}
	}
	return sc.Err()
}

func main() {
	extraFile := flag.String("extra", "", "file whose lines are printed before the total (e.g. critest results)")
	recordFile := flag.String("record", "", "copy the go test -json stream on stdin to this file, printing progress, and exit")
	flag.Parse()
	if *recordFile != "" {
		if err := record(os.Stdin, *recordFile); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
		return
	}
	s := newSummary()
	for _, f := range flag.Args() {
		fh, err := os.Open(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
		err = s.read(fh)
		_ = fh.Close()
		if err != nil {
			fmt.Fprintf(os.Stderr, "testsummary: %s: %v\n", f, err)
			os.Exit(2)
		}
	}
	var extra []string
	extraFailed := false
	if *extraFile != "" {
		if b, err := os.ReadFile(*extraFile); err == nil {
			for l := range strings.Lines(string(b)) {
				l = strings.TrimRight(l, "\n")
				extra = append(extra, l)
				if strings.HasPrefix(l, "FAIL") {
					extraFailed = true
				}
			}
		}
	}
	if s.print(os.Stdout, extra) || extraFailed {
		os.Exit(1)
	}
}
