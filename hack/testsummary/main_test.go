package main

import (
	"bytes"
	"strings"
	"testing"
)

const stream = `{"Action":"run","Package":"p/a","Test":"TestOK"}
{"Action":"pass","Package":"p/a","Test":"TestOK","Elapsed":0.1}
{"Action":"run","Package":"p/a","Test":"TestSkip"}
{"Action":"output","Package":"p/a","Test":"TestSkip","Output":"    a_test.go:9: needs root\n"}
{"Action":"output","Package":"p/a","Test":"TestSkip","Output":"--- SKIP: TestSkip (0.00s)\n"}
{"Action":"skip","Package":"p/a","Test":"TestSkip","Elapsed":0}
{"Action":"pass","Package":"p/a","Elapsed":0.2}
{"Action":"run","Package":"p/b","Test":"TestBad"}
{"Action":"output","Package":"p/b","Test":"TestBad","Output":"=== RUN   TestBad\n"}
{"Action":"output","Package":"p/b","Test":"TestBad","Output":"    b_test.go:7: QEMU said no\n"}
{"Action":"output","Package":"p/b","Test":"TestBad","Output":"    testenv.go:102: VM log:\n"}
{"Action":"output","Package":"p/b","Test":"TestBad","Output":"        [    4.408330] reboot: Power down\n"}
{"Action":"output","Package":"p/b","Test":"TestBad","Output":"--- FAIL: TestBad (1.00s)\n"}
{"Action":"fail","Package":"p/b","Test":"TestBad","Elapsed":1}
{"Action":"fail","Package":"p/b","Elapsed":1.1}
# p/c
c.go:3:1: syntax error
{"Action":"fail","Package":"p/c","Elapsed":0}
`

func TestSummaryCountsAndReasons(t *testing.T) {
	s := newSummary()
	if err := s.read(strings.NewReader(stream)); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	failed := s.print(&out, []string{"critest[runc]: 1 passed, 0 failed, 0 skipped"})
	got := out.String()
	if !failed {
		t.Error("a failed test and a broken build did not fail the summary")
	}
	for _, want := range []string{
		"p/a TestSkip: needs root",
		"p/b TestBad\n      b_test.go:7: QEMU said no\n      testenv.go:102: VM log:\n\n",
		"BUILD FAILED",
		"c.go:3:1: syntax error",
		"critest[runc]: 1 passed",
		"go test: 1 passed, 1 failed, 1 skipped, 1 packages failed to build",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("summary lacks %q:\n%s", want, got)
		}
	}
	if !strings.HasSuffix(strings.TrimSpace(got), "1 packages failed to build") {
		t.Errorf("summary does not end with the total:\n%s", got)
	}
}
